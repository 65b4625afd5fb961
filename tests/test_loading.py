"""load_clip_model: shipped names, HF directories, OpenAI/open_clip files, hub ids, and errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_convert import make_openai_shaped_clip, to_openai_layout
from torch import nn
from transformers import AutoTokenizer, BertConfig, CLIPModel

from zegkit.backbone import loading
from zegkit.backbone.loading import load_clip_model

TEXTS = ["a photo of a dog", "red car on the road", "sky"]
TOLERANCE = 1e-5


def embeddings(model: CLIPModel, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected image and text embeddings for fixed inputs (text padded, so pooling matters)."""
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = tokenizer(TEXTS, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**ids).pooler_output
    return image, text


def assert_same_embeddings(model, reference, tokenizer) -> None:
    for got, want in zip(embeddings(model, tokenizer), embeddings(reference, tokenizer),
                         strict=True):
        assert (got - want).abs().max().item() <= TOLERANCE


def assert_frozen_fp32(model: CLIPModel) -> None:
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())


class _Holder(nn.Module):
    """Holds tensors under OpenAI's dotted names so TorchScript saves them like OpenAI's archive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript_archive(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    root = _Holder()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _Holder())
            module = getattr(module, name)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, value.clone())
    torch.jit.script(root).save(str(path))


@pytest.fixture(scope="module")
def reference():
    return make_openai_shaped_clip(seed=3)


@pytest.fixture(scope="module")
def openai_sd(reference):
    return to_openai_layout(reference.state_dict())


@pytest.fixture(scope="module")
def tokenizer(tiny_clip_dir):
    return AutoTokenizer.from_pretrained(tiny_clip_dir)


@pytest.fixture()
def weights_only_dir(tmp_path, tiny_clip_dir):
    """A model directory without tokenizer files: CLIPTokenizer silently loads 2 tokens from it."""
    target = tmp_path / "weights-only"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_clip_dir / name, target / name)
    return target


@pytest.fixture()
def dir_copy(tmp_path, tiny_clip_dir):
    target = tmp_path / "copy"
    shutil.copytree(tiny_clip_dir, target)
    return target


# --------------------------------------------------------------------------- checkpoint files


def test_plain_state_dict_file(tmp_path, openai_sd, reference, tokenizer, tiny_clip_dir):
    path = tmp_path / "openai-layout.pt"
    torch.save(openai_sd, path)
    model, tok, name = load_clip_model(path, tokenizer_source=str(tiny_clip_dir))
    assert name == str(path)
    assert_frozen_fp32(model)
    assert model.config.text_config.eos_token_id == tok.eos_token_id
    assert_same_embeddings(model, reference, tokenizer)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_archive_in_fp16(tmp_path, openai_sd, tokenizer, tiny_clip_dir):
    """Like OpenAI's ~/.cache/clip/*.pt: TorchScript, fp16 weights, extra scalar buffers."""
    half = {key: value.half() for key, value in openai_sd.items()}
    extras = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(600)}
    path = tmp_path / "archive.pt"
    save_torchscript_archive({**half, **extras}, path)
    model, _, _ = load_clip_model(str(path), tokenizer_source=tiny_clip_dir)
    assert_frozen_fp32(model)
    # the reference: the same fp16 values, widened to fp32
    reference = make_openai_shaped_clip(seed=3)
    reference.load_state_dict({k: v.half().float() for k, v in reference.state_dict().items()})
    assert_same_embeddings(model, reference, tokenizer)


def test_training_checkpoint_with_ddp_prefix(tmp_path, openai_sd, reference, tokenizer,
                                             tiny_clip_dir):
    path = tmp_path / "epoch_3.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in openai_sd.items()}}, path)
    model, _, _ = load_clip_model(path, tokenizer_source=tiny_clip_dir)
    assert_same_embeddings(model, reference, tokenizer)


def test_safetensors_file(tmp_path, openai_sd, reference, tokenizer, tiny_clip_dir):
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in openai_sd.items()}, path)
    model, _, _ = load_clip_model(path, tokenizer_source=tiny_clip_dir)
    assert_same_embeddings(model, reference, tokenizer)


def test_checkpoint_activation_argument(tmp_path, openai_sd, tiny_clip_dir):
    path = tmp_path / "laion.bin"
    torch.save(openai_sd, path)
    model, _, _ = load_clip_model(path, tokenizer_source=tiny_clip_dir, hidden_act="gelu")
    assert model.config.vision_config.hidden_act == model.config.text_config.hidden_act == "gelu"


def test_openai_file_names_pick_the_hub_tokenizer():
    assert loading._checkpoint_tokenizer(Path("c/ViT-B-16.pt"), None) == \
        "openai/clip-vit-base-patch16"
    assert loading._checkpoint_tokenizer(Path("c/ViT-L-14-336px.pt"), None) == \
        "openai/clip-vit-large-patch14-336"
    assert loading._checkpoint_tokenizer(Path("c/ViT-B-16.pt"), "mine") == "mine"


def test_openai_file_name_with_uncached_tokenizer_says_what_to_download(
        tmp_path, openai_sd, monkeypatch):
    monkeypatch.setitem(loading.OPENAI_CHECKPOINT_REPOS, "ViT-B-16.pt", "zegkit-tests/not-cached")
    path = tmp_path / "ViT-B-16.pt"
    torch.save(openai_sd, path)
    with pytest.raises(FileNotFoundError) as err:
        load_clip_model(path)
    message = str(err.value)
    assert 'hf download zegkit-tests/not-cached --include "*.json" "*.txt"' in message
    assert "HF_HUB_OFFLINE" in message and "--tokenizer DIR" in message


def test_checkpoint_needs_a_tokenizer_source(tmp_path, openai_sd):
    path = tmp_path / "finetuned.pt"
    torch.save(openai_sd, path)
    with pytest.raises(ValueError, match="holds no tokenizer.*tokenizer_source"):
        load_clip_model(path)


def test_checkpoint_with_two_token_tokenizer_dir(tmp_path, openai_sd, weights_only_dir):
    path = tmp_path / "finetuned.pt"
    torch.save(openai_sd, path)
    with pytest.raises(RuntimeError, match="has 2 tokens"):
        load_clip_model(path, tokenizer_source=weights_only_dir)


def test_tokenizer_source_must_be_a_directory(tmp_path, openai_sd):
    path = tmp_path / "finetuned.pt"
    torch.save(openai_sd, path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_clip_model(path, tokenizer_source=str(tmp_path / "missing" / "tok"))


def test_resnet_checkpoint_is_refused(tmp_path, openai_sd, tiny_clip_dir):
    path = tmp_path / "RN50.pt"
    torch.save({**openai_sd, "visual.layer1.0.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="ResNet CLIP"):
        load_clip_model(path, tokenizer_source=tiny_clip_dir)


def test_unsupported_file_type(tmp_path, tiny_clip_dir):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match="Unsupported checkpoint file 'weights.npz'"):
        load_clip_model(path, tokenizer_source=tiny_clip_dir)


def test_corrupt_checkpoint(tmp_path, tiny_clip_dir):
    path = tmp_path / "truncated.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="Could not read checkpoint"):
        load_clip_model(path, tokenizer_source=tiny_clip_dir)


def test_pickle_without_tensors(tmp_path, tiny_clip_dir):
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_clip_model(path, tokenizer_source=tiny_clip_dir)


# --------------------------------------------------------------------------- Hugging Face format


def test_hf_directory(tiny_clip_dir, tokenizer):
    model, tok, name = load_clip_model(str(tiny_clip_dir))
    assert name == str(tiny_clip_dir)
    assert_frozen_fp32(model)
    assert tok.model_max_length == model.config.text_config.max_position_embeddings == 77
    assert_same_embeddings(model, CLIPModel.from_pretrained(tiny_clip_dir), tokenizer)


def test_pathlike_source(tiny_clip_dir):
    _, _, name = load_clip_model(Path(tiny_clip_dir))
    assert name == str(tiny_clip_dir)


def test_directory_without_tokenizer_is_the_two_token_trap(weights_only_dir):
    with pytest.raises(RuntimeError, match="has 2 tokens"):
        load_clip_model(weights_only_dir)


def test_tokenizer_source_overrides_the_directory(weights_only_dir, tiny_clip_dir):
    _, tok, _ = load_clip_model(weights_only_dir, tokenizer_source=str(tiny_clip_dir))
    assert len(tok) > 2


def test_hidden_act_is_refused_for_hf_configs(tiny_clip_dir):
    with pytest.raises(ValueError, match="hidden_act applies only to checkpoint files"):
        load_clip_model(tiny_clip_dir, hidden_act="gelu")


def test_not_a_clip(tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'bert'.*openai/clip-vit-base-patch16"):
        load_clip_model(tmp_path)


def test_weights_that_do_not_fit_the_config(dir_copy):
    config = json.loads((dir_copy / "config.json").read_text())
    config["projection_dim"] = 16
    (dir_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=r"do not match its config.*text_projection\.weight"):
        load_clip_model(dir_copy)


def test_weights_missing_tensors(dir_copy):
    weights = load_file(dir_copy / "model.safetensors")
    del weights["vision_model.post_layernorm.weight"]
    save_file(weights, dir_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="vision_model.post_layernorm.weight"):
        load_clip_model(dir_copy)


def test_config_without_weights(dir_copy):
    (dir_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_clip_model(dir_copy)


def test_directory_without_config(tmp_path):
    (tmp_path / "ViT-B-16.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="without config.json.*ViT-B-16.pt"):
        load_clip_model(tmp_path)


def test_unknown_hub_id_offline():
    with pytest.raises(FileNotFoundError) as err:
        load_clip_model("zegkit-tests/no-such-clip")
    message = str(err.value)
    assert "hf download zegkit-tests/no-such-clip" in message and "HF_HUB_OFFLINE" in message


def test_missing_local_file():
    with pytest.raises(FileNotFoundError, match="No such file or directory.*zegkit/tiny-synthetic"):
        load_clip_model("~/.cache/clip/zegkit-no-such-model.pt")


# --------------------------------------------------------------------------- shipped models


def test_shipped_name_comes_first(monkeypatch, tiny_clip_dir):
    monkeypatch.setitem(loading.SHIPPED_MODELS, "zegkit/tiny-synthetic", Path(tiny_clip_dir))
    model, _, name = load_clip_model("zegkit/tiny-synthetic")
    assert name == "zegkit/tiny-synthetic"
    assert_frozen_fp32(model)


def test_shipped_model_missing_from_installation(monkeypatch, tmp_path):
    monkeypatch.setitem(loading.SHIPPED_MODELS, "zegkit/tiny-synthetic", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="missing from this installation"):
        load_clip_model("zegkit/tiny-synthetic")


# --------------------------------------------------------------------------- damaged weights


def _copy_without_weights(source, target):
    shutil.copytree(source, target)
    (target / "model.safetensors").unlink()
    return target


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_safetensors_in_a_model_directory_names_the_file(tmp_path, tiny_clip_dir, damage):
    data = (tiny_clip_dir / "model.safetensors").read_bytes()
    folder = _copy_without_weights(tiny_clip_dir, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                         "garbage": b"\x07" * 64}[damage])
    with pytest.raises(RuntimeError, match="Could not read the model weights") as caught:
        load_clip_model(folder)
    assert str(weights) in str(caught.value)


def test_truncated_pytorch_model_bin_names_the_file(tmp_path, tiny_clip_dir):
    folder = _copy_without_weights(tiny_clip_dir, tmp_path / "model")
    weights = folder / "pytorch_model.bin"
    torch.save(CLIPModel.from_pretrained(tiny_clip_dir).state_dict(), weights)
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(RuntimeError, match="Could not read the model weights") as caught:
        load_clip_model(folder)
    assert str(weights) in str(caught.value)


class _RunsCode:
    """Unpickling this calls Path.touch(marker): the payload of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("where", ["pytorch_model.bin in a model directory", "checkpoint file"])
def test_malicious_pickle_never_runs(tmp_path, tiny_clip_dir, where):
    marker = tmp_path / "code-ran"
    payload = {"visual.proj": torch.zeros(2), "evil": _RunsCode(marker)}
    if where == "checkpoint file":
        source = tmp_path / "ViT-B-16.pt"
        torch.save(payload, source)
    else:
        source = _copy_without_weights(tiny_clip_dir, tmp_path / "model")
        torch.save(payload, source / "pytorch_model.bin")
    with pytest.raises(RuntimeError, match="Could not read"):
        load_clip_model(source, tokenizer_source=tiny_clip_dir)
    assert not marker.exists()


def test_loading_prints_no_progress_bar(tiny_clip_dir, capfd):
    load_clip_model(tiny_clip_dir)
    assert "Loading weights" not in capfd.readouterr().err
