"""The Gradio page of `zegkit serve`: widgets wired to `zegkit.serve.engine`.

Gradio keeps its uploads and the files it hands out in its cache folder, which we put inside the
output folder (GRADIO_TEMP_DIR), and it serves nothing outside its cache and `allowed_paths`
(here: the output folder only). Uploaded files reach the handler unprocessed
(`preprocess=False`) so that a non-image gives our message, not Gradio's; the handler then checks
that the file lies in the upload folder before opening it.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import gradio as gr

from zegkit.cli import parse_class_list
from zegkit.data.base import shipped_class_names
from zegkit.serve.engine import (
    DEFAULT_OPACITY,
    Result,
    SegmenterPool,
    UploadLimits,
    check_upload,
    check_vocabulary,
    new_run_folder,
    render_result,
    run_segmentation,
    safe_stem,
    user_message,
)

NO_SECOND_METHOD = "(none)"
NO_CHECKPOINT = "(none)"
EXAMPLES_PACKAGE, EXAMPLES_FOLDER = "zegkit", "assets/examples"
EXAMPLE_CLASS_LIST = "synthetic (shipped examples)"
BENCHMARK_CLASS_LISTS = (
    "voc21",
    "voc20",
    "context60",
    "context59",
    "coco_object",
    "coco_stuff171",
    "cityscapes19",
    "ade150",
)
STATIC = Path(__file__).resolve().parent / "static"
# System fonts only: the default theme fetches web fonts, which an offline machine cannot reach.
FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")


@dataclass
class ServeConfig:
    """What the page offers and where its files go (the `zegkit serve` flags).

    Attributes:
        out_dir: the only folder the server writes to and serves from.
        pool: the segmenters, built on first use and kept.
        limits: upload caps.
        methods: the method names to offer.
        method: the one selected at start.
        models: the models offered; `models[0]` is selected at start.
        checkpoints: trained method files offered.
        refiners: the refinement choices.
        refine: the one selected at start.
        custom_paths: whether the page may type other models and checkpoints (any path or hub id
            the server can read); on by default only when bound to localhost.
    """

    out_dir: Path
    pool: SegmenterPool
    limits: UploadLimits = field(default_factory=UploadLimits)
    methods: list[str] = field(default_factory=list)
    method: str = "sclip"
    models: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    refiners: list[str] = field(default_factory=lambda: ["none"])
    refine: str = "none"
    custom_paths: bool = True

    @property
    def upload_dir(self) -> Path:
        return self.out_dir / "gradio"


@dataclass
class PageState:
    """One browser session's last results, for re-rendering without re-running."""

    image: object = None
    results: list[Result] = field(default_factory=list)


def _examples() -> list[list[str]]:
    """[image path, its classes] for each shipped example scene."""
    folder = resources.files(EXAMPLES_PACKAGE) / EXAMPLES_FOLDER
    rows = []
    for name in ("scene", "scene2"):
        meta = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        rows.append([str(folder / f"{name}.png"), ", ".join(meta["classes"])])
    return rows


def load_class_list(name: str) -> str:
    """A class list for the text box: classes joined by ', ', synonyms by '; '."""
    if name == EXAMPLE_CLASS_LIST:
        from zegkit.text import read_class_file

        with resources.as_file(
            resources.files(EXAMPLES_PACKAGE) / EXAMPLES_FOLDER / "classes.txt"
        ) as path:
            entries = read_class_file(path)
    else:
        entries = shipped_class_names(name)
    return ", ".join(entries)


def parse_vocabulary(text: str) -> list[str]:
    """Classes from the text box: separated by ',' or new lines, synonyms by ';' (as the CLI).

    Raises:
        ValueError: no class given.
    """
    lines = [line for line in (text or "").splitlines() if line.strip()]
    classes = [entry for line in lines for entry in parse_class_list(line) if entry]
    if not classes:
        raise ValueError(
            "The vocabulary is empty: type class names separated by commas, e.g. "
            "'sky, sand; beach, brick', or load a class list."
        )
    check_vocabulary(classes)
    return classes


def _status(message: str, *, error: bool) -> str:
    kind = "zk-error" if error else "zk-ok"
    role = ' role="alert"' if error else ""
    return f'<div class="{kind}"{role}>{html.escape(message)}</div>'


def _uploaded_path(payload: object, config: ServeConfig) -> Path:
    """The file behind an unprocessed image value, which must lie in the upload folder.

    Raises:
        ValueError: no image, or a path outside the upload folder (never opened).
    """
    if not payload:
        raise ValueError("No image: upload, drop or paste one, or pick an example below.")
    path = payload.get("path") if isinstance(payload, dict) else None
    if not path:
        raise ValueError("The upload did not arrive; upload the image again.")
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(config.upload_dir.resolve()) or not resolved.is_file():
        raise ValueError("The upload did not arrive; upload the image again.")
    return resolved


def _original_name(payload: dict, path: Path) -> str:
    return str(payload.get("orig_name") or path.name)


def build_app(config: ServeConfig) -> gr.Blocks:
    """The page: inputs on the left, results (one or two methods) on the right."""
    theme = gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)
    with gr.Blocks(title="zegkit", analytics_enabled=False) as app:
        app.zegkit_theme = theme
        state = gr.State(PageState())
        gr.Markdown(
            "# zegkit: zero-shot segmentation\nUpload an image, type any class names "
            "(`,` between classes, `;` between synonyms), pick a method, press **Segment**. "
            "Hover the overlay for the class and its probability."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    label="Image",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    elem_id="zk-image",
                )
                classes = gr.Textbox(
                    label="Classes",
                    placeholder="sky, sand; beach, brick, star",
                    lines=2,
                    elem_id="zk-classes",
                )
                class_list = gr.Dropdown(
                    [EXAMPLE_CLASS_LIST, *BENCHMARK_CLASS_LISTS],
                    value=None,
                    label="Load a class list",
                    elem_id="zk-class-list",
                )
                with gr.Row():
                    method_a = gr.Dropdown(
                        config.methods, value=config.method, label="Method", elem_id="zk-method"
                    )
                    method_b = gr.Dropdown(
                        [NO_SECOND_METHOD, *config.methods],
                        value=NO_SECOND_METHOD,
                        label="Compare with",
                        elem_id="zk-method-b",
                    )
                model = gr.Dropdown(
                    config.models,
                    value=config.models[0],
                    label="Model",
                    allow_custom_value=config.custom_paths,
                    elem_id="zk-model",
                )
                with gr.Row():
                    checkpoint = gr.Dropdown(
                        [NO_CHECKPOINT, *config.checkpoints],
                        value=NO_CHECKPOINT,
                        label="Trained checkpoint",
                        allow_custom_value=config.custom_paths,
                        elem_id="zk-checkpoint",
                    )
                    refine = gr.Dropdown(
                        config.refiners,
                        value=config.refine,
                        label="Refinement",
                        elem_id="zk-refine",
                    )
                run = gr.Button("Segment", variant="primary", elem_id="zk-run")
                gr.Examples(_examples(), inputs=[image, classes], label="Shipped examples")
            with gr.Column(scale=2):
                status = gr.HTML("", elem_id="zk-status")
                with gr.Row():
                    opacity = gr.Slider(
                        0.0,
                        1.0,
                        value=DEFAULT_OPACITY,
                        step=0.05,
                        label="Opacity",
                        elem_id="zk-opacity",
                    )
                    shown = gr.CheckboxGroup([], label="Show classes", elem_id="zk-shown")
                with gr.Row():
                    panel_a = gr.HTML("", elem_id="zk-result-a")
                    panel_b = gr.HTML("", elem_id="zk-result-b")
                downloads = gr.File(
                    label="Downloads (label PNG, overlay, JSON: the files `zegkit segment` writes)",
                    file_count="multiple",
                    interactive=False,
                    elem_id="zk-downloads",
                )

        def segment(
            payload,
            text,
            first,
            second,
            model_name,
            trained,
            refinement,
            alpha,
            progress=gr.Progress(),  # noqa: B008 (Gradio's progress idiom: it injects this)
        ):
            try:
                path = _uploaded_path(payload, config)
                picture = check_upload(path, config.limits)
                vocabulary = parse_vocabulary(text)
                if not model_name:
                    raise ValueError("Choose a model.")
                if not config.custom_paths and model_name not in config.models:
                    raise ValueError(f"Model {model_name!r} is not offered; pick one of the list.")
                trained = None if trained in (None, "", NO_CHECKPOINT) else trained
                methods = [first] + ([second] if second not in (None, NO_SECOND_METHOD) else [])
                stem = safe_stem(_original_name(payload, path))
                folder = new_run_folder(config.out_dir)
                results = []
                for step, method in enumerate(methods):

                    def note(what: str, step: int = step, method: str = method) -> None:
                        progress(step / len(methods), desc=f"{method}: {what}")

                    with config.pool.lock:
                        start = time.perf_counter()
                        note("loading the model (first use only)")
                        segmenter = config.pool.get(method, model_name, trained, refinement)
                        note("embedding the classes (once per vocabulary)")
                        segmenter.set_vocabulary(vocabulary)
                        note("segmenting")
                        segmentation, confidence = run_segmentation(segmenter, picture)
                        seconds = time.perf_counter() - start
                    note("writing files")
                    # One method: the CLI's names; two: the method in the name tells them apart.
                    name = stem if len(methods) == 1 else f"{stem}_{method}"
                    files = segmentation.save(folder / method, name, picture)
                    results.append(Result(method, segmentation, confidence, files, seconds))
            except Exception as error:  # every failure becomes a sentence on the page
                return (_status(user_message(error), error=True), *([gr.skip()] * 5))
            names = results[0].segmentation.class_names
            page = PageState(picture, results)
            panels = [render_result(r, picture, alpha, None) for r in results] + [""]
            message = "; ".join(f"{r.method}: {r.seconds:.2f} s" for r in results)
            return (
                _status(f"Done ({message}).", error=False),
                panels[0],
                panels[1],
                gr.update(choices=names, value=names),
                [str(p) for r in results for p in r.files.values()],
                page,
            )

        def redraw(page: PageState, alpha: float, visible: list[str]):
            if not page.results:
                return gr.skip(), gr.skip()
            try:
                panels = [render_result(r, page.image, alpha, visible) for r in page.results]
            except Exception as error:
                return _status(user_message(error), error=True), gr.skip()
            return panels[0], panels[1] if len(panels) > 1 else ""

        run.click(
            segment,
            inputs=[image, classes, method_a, method_b, model, checkpoint, refine, opacity],
            outputs=[status, panel_a, panel_b, shown, downloads, state],
            preprocess=False,
            concurrency_limit=1,
        )
        class_list.input(
            lambda name: load_class_list(name) if name else gr.skip(), class_list, classes
        )
        opacity.release(redraw, [state, opacity, shown], [panel_a, panel_b])
        shown.input(redraw, [state, opacity, shown], [panel_a, panel_b])
    return app


def launch(config: ServeConfig, host: str, port: int, *, block: bool = True) -> gr.Blocks:
    """Build the page and serve it (blocking unless `block` is False)."""
    app = build_app(config)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        show_error=False,
        allowed_paths=[str(config.out_dir)],
        max_file_size=config.limits.max_bytes,
        ssr_mode=False,
        prevent_thread_lock=not block,
        footer_links=[],
        theme=app.zegkit_theme,
        css=(STATIC / "style.css").read_text(encoding="utf-8"),
        head=f"<script>{(STATIC / 'hover.js').read_text(encoding='utf-8')}</script>",
        quiet=False,
    )
    return app
