"""Vocabulary parsing, template ensembling, synonym reduction and the text-embedding disk cache."""

import os

import pytest
import torch
from conftest import make_tiny_clip

from zegkit.backbone import ClipBackbone
from zegkit.text import (
    TEMPLATES,
    TextEmbeddings,
    default_cache_dir,
    encode_vocabulary,
    parse_classes,
    read_class_file,
    reduce_synonym_logits,
    resolve_templates,
)

TOL = 1e-5


@pytest.fixture
def backbone(tiny_tokenizer):
    return ClipBackbone(make_tiny_clip(16), tiny_tokenizer, "tiny-b16")


def _count_text_passes(backbone: ClipBackbone) -> list[int]:
    """Count forward passes of the real text transformer (one per encode_text call)."""
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1

    backbone.model.text_model.register_forward_hook(hook)
    return calls


def _ensemble_directly(backbone: ClipBackbone, phrase: str, templates) -> torch.Tensor:
    per_template = torch.cat([backbone.encode_text([t.format(phrase)]) for t in templates])
    per_template = per_template / per_template.norm(dim=-1, keepdim=True)
    mean = per_template.mean(dim=0)
    return mean / mean.norm()


# ---- parsing ----------------------------------------------------------------------------------
def test_parse_classes_splits_synonyms_and_cleans_whitespace():
    parsed = parse_classes(["person;  people ;man", "sky", ["red  car", "auto"], "table, dining"])
    assert parsed == [["person", "people", "man"], ["sky"], ["red car", "auto"], ["table, dining"]]


@pytest.mark.parametrize(
    ("classes", "fragment"),
    [
        ([], "vocabulary is empty"),
        ("dog", "single string"),
        (["dog", "  "], "Class 1"),
        (["dog", "cat;;kitten"], "empty synonym"),
        (["dog", "cat;"], "trailing ';'"),
        (["dog", "Dog"], "in class 0"),
        (["person; man", "man"], "Merge"),
        (["cat; cat"], "twice"),
        (["dog", 3], "must be a string"),
    ],
)
def test_parse_classes_rejects_bad_vocabularies(classes, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_classes(classes)


def test_read_class_file_formats(tmp_path):
    sclip_style = tmp_path / "cls_voc.txt"
    sclip_style.write_text(
        "sky, wall, tree\naeroplane\nperson, person in shirt\n\n\n", encoding="utf-8"
    )
    expected = ["sky; wall; tree", "aeroplane", "person; person in shirt"]
    assert read_class_file(sclip_style) == expected
    semicolons = tmp_path / "mine.txt"
    semicolons.write_text("# a comment\ntable, dining; desk\ndog\n", encoding="utf-8")
    assert read_class_file(semicolons) == ["table, dining; desk", "dog"]


def test_read_class_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_class_file(tmp_path / "missing.txt")
    gap = tmp_path / "gap.txt"
    gap.write_text("dog\n\ncat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"gap.txt:2 is blank"):
        read_class_file(gap)
    dup = tmp_path / "dup.txt"
    dup.write_text("dog\ncat, dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match="dup.txt.*one class only"):
        read_class_file(dup)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no class names"):
        read_class_file(empty)


def test_templates():
    assert len(TEMPLATES["imagenet"]) == 80 == len(set(TEMPLATES["imagenet"]))
    assert len(TEMPLATES["short"]) == 7 and set(TEMPLATES["short"]) <= set(TEMPLATES["imagenet"])
    assert TEMPLATES["maskclip"][:80] == TEMPLATES["imagenet"] and len(TEMPLATES["maskclip"]) == 85
    assert all(t.count("{}") == 1 for group in TEMPLATES.values() for t in group)
    assert resolve_templates(["{} here"]) == ("{} here",)
    with pytest.raises(ValueError, match=r"Unknown template set 'nope'.*'imagenet'"):
        resolve_templates("nope")
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates(["a photo"])
    with pytest.raises(ValueError, match="empty"):
        resolve_templates([])


# ---- encoding ---------------------------------------------------------------------------------
def test_template_ensemble_matches_direct_computation(backbone, tmp_path):
    text = encode_vocabulary(backbone, ["dog", "grass; sky"], "short", cache_dir=tmp_path)
    templates = TEMPLATES["short"]
    phrases = ("dog", "grass", "sky")
    expected = torch.stack([_ensemble_directly(backbone, p, templates) for p in phrases])
    assert (text.synonym_embeddings - expected).abs().max() <= TOL
    assert text.class_index.tolist() == [0, 1, 1]
    class_mean = expected[1:].mean(dim=0)
    assert (text.embeddings[1] - class_mean / class_mean.norm()).abs().max() <= TOL
    assert (text.embeddings[0] - expected[0]).abs().max() <= TOL
    assert torch.allclose(text.embeddings.norm(dim=-1), torch.ones(2), atol=TOL)
    assert text.class_names == ["dog", "grass"] and text.synonyms == [["dog"], ["grass", "sky"]]
    assert text.embeddings.dtype == torch.float32 and text.model_name == "tiny-b16"
    assert text.templates == templates


def test_batch_size_does_not_change_embeddings(backbone, tmp_path):
    kwargs = dict(templates="short", use_cache=False)
    one_call = encode_vocabulary(backbone, ["dog", "cat; red car"], batch_size=256, **kwargs)
    small = encode_vocabulary(backbone, ["dog", "cat; red car"], batch_size=2, **kwargs)
    assert (one_call.synonym_embeddings - small.synonym_embeddings).abs().max() <= TOL


def test_classifier_rows_follow_synonym_reduce(backbone, tmp_path):
    classes = ["dog", "grass; sky", "car"]
    by_max = encode_vocabulary(backbone, classes, "single", "max", cache_dir=tmp_path)
    by_mean = encode_vocabulary(backbone, classes, "single", "mean", cache_dir=tmp_path)
    assert by_max.classifier.shape[0] == 4 and by_mean.classifier.shape[0] == 3
    assert torch.equal(by_max.embeddings, by_mean.embeddings)


def test_encode_vocabulary_arguments(backbone, tmp_path):
    text = encode_vocabulary(backbone, ["sky; wall; tree", "dog"], "single",
                             class_names=["background", "dog"], cache_dir=tmp_path)
    assert text.class_names == ["background", "dog"] and text.synonyms[0] == ["sky", "wall", "tree"]
    with pytest.raises(ValueError, match="one non-blank name per class"):
        encode_vocabulary(backbone, ["a", "b"], "single", class_names=["x"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"synonym_reduce 'median'.*'max', 'mean'"):
        encode_vocabulary(backbone, ["a"], synonym_reduce="median", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        encode_vocabulary(backbone, ["a"], batch_size=0, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="encode_text"):
        encode_vocabulary(object(), ["a"], cache_dir=tmp_path)


# ---- cache ------------------------------------------------------------------------------------
def test_cache_hit_returns_identical_tensors_without_recomputing(backbone, tmp_path):
    calls = _count_text_passes(backbone)
    first = encode_vocabulary(backbone, ["dog", "grass; sky"], "short", cache_dir=tmp_path)
    computed = calls[0]
    assert computed >= 1
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 1 and files[0].endswith(".safetensors")  # no temp files left behind
    second = encode_vocabulary(backbone, ["dog", "grass; sky"], "short", cache_dir=tmp_path)
    assert calls[0] == computed
    assert torch.equal(first.synonym_embeddings, second.synonym_embeddings)
    assert torch.equal(first.embeddings, second.embeddings)
    # The reduction is applied on load, so "mean" reuses the same cached rows.
    encode_vocabulary(backbone, ["dog", "grass; sky"], "short", "mean", cache_dir=tmp_path)
    assert calls[0] == computed
    encode_vocabulary(backbone, ["dog", "grass; sky"], "short", use_cache=False, cache_dir=tmp_path)
    assert calls[0] == 2 * computed


def test_cache_misses_on_other_templates_classes_or_weights(backbone, tiny_tokenizer, tmp_path):
    calls = _count_text_passes(backbone)
    encode_vocabulary(backbone, ["dog"], "short", cache_dir=tmp_path)
    encode_vocabulary(backbone, ["dog"], "single", cache_dir=tmp_path)
    encode_vocabulary(backbone, ["dog", "cat"], "short", cache_dir=tmp_path)
    assert calls[0] == 3 and len(os.listdir(tmp_path)) == 3
    same_name_other_weights = ClipBackbone(make_tiny_clip(16, seed=7), tiny_tokenizer, "tiny-b16")
    other = encode_vocabulary(same_name_other_weights, ["dog"], "short", cache_dir=tmp_path)
    mine = encode_vocabulary(backbone, ["dog"], "short", cache_dir=tmp_path)
    assert not torch.allclose(other.embeddings, mine.embeddings)


def test_corrupt_cache_is_recomputed_and_replaced(backbone, tmp_path):
    first = encode_vocabulary(backbone, ["dog"], "single", cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a safetensors file")
    calls = _count_text_passes(backbone)
    with pytest.warns(UserWarning, match="unreadable"):
        again = encode_vocabulary(backbone, ["dog"], "single", cache_dir=tmp_path)
    assert calls[0] == 1 and torch.equal(first.embeddings, again.embeddings)
    encode_vocabulary(backbone, ["dog"], "single", cache_dir=tmp_path)  # rewritten: a hit now
    assert calls[0] == 1


def test_unwritable_cache_warns_and_still_returns(backbone, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="Could not write"):
        text = encode_vocabulary(backbone, ["dog"], "single", cache_dir=blocker / "sub")
    assert text.embeddings.shape[0] == 1


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ZEGKIT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "text"
    monkeypatch.delenv("ZEGKIT_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "zegkit", "text")


# ---- synonym reduction ------------------------------------------------------------------------
def _vocabulary(reduce: str) -> TextEmbeddings:
    rows = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    index = torch.tensor([0, 1, 1, 1, 2])
    means = torch.nn.functional.normalize(
        torch.stack([rows[index == c].mean(0) for c in range(3)]), dim=-1
    )
    return TextEmbeddings(
        embeddings=means, class_names=["bg", "person", "dog"],
        synonyms=[["bg"], ["person", "people", "man"], ["dog"]],
        synonym_embeddings=rows, class_index=index, synonym_reduce=reduce,
    )


def test_reduce_synonym_logits_takes_max_per_class():
    torch.manual_seed(0)
    text = _vocabulary("max")
    logits = torch.randn(2, 5, 3, 4)
    reduced = reduce_synonym_logits(logits, text)
    assert reduced.shape == (2, 3, 3, 4)
    assert torch.equal(reduced[:, 0], logits[:, 0]) and torch.equal(reduced[:, 2], logits[:, 4])
    assert torch.equal(reduced[:, 1], logits[:, 1:4].amax(dim=1))
    # SCLIP's protocol (max over probabilities of a joint softmax) keeps the same argmax.
    probs = reduce_synonym_logits((50 * logits).softmax(dim=1), text)
    assert torch.equal(probs.argmax(dim=1), reduced.argmax(dim=1))


def test_reduce_synonym_logits_mean_is_identity_and_checks_shape():
    text = _vocabulary("mean")
    logits = torch.randn(1, 3, 2, 2)
    assert reduce_synonym_logits(logits, text) is logits
    with pytest.raises(ValueError, match=r"B x 3 x \.\.\."):
        reduce_synonym_logits(torch.randn(1, 5, 2, 2), text)
    with pytest.raises(ValueError, match=r"B x 5"):
        reduce_synonym_logits(torch.randn(1, 3), _vocabulary("max"))


def test_to_moves_and_casts():
    text = _vocabulary("max").to(dtype=torch.float64)
    assert text.embeddings.dtype == text.synonym_embeddings.dtype == torch.float64
    assert text.class_index.dtype == torch.long
