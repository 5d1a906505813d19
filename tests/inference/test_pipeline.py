"""The pipeline API: every input kind, batch == singles, errors, options."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import mplug_fast
from mplug_fast.generation import beam as beam_module
from mplug_fast.inference import caption_generate
from mplug_fast.pipeline import Pipeline


def _image(seed: int, size=(40, 56)) -> np.ndarray:
    """HWC uint8 [H, W, 3] with some structure (blocks), so different images give different outputs."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.kron(small, np.ones((size[0] // 4, size[1] // 4, 1), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipes(models, tokenizer) -> dict:
    return {
        "vqa": Pipeline(models["vqa"], tokenizer),
        "caption": Pipeline(models["caption"], tokenizer, max_length=6, min_length=2, beam_size=3),
        "grounding": Pipeline(models["grounding"], tokenizer),
        "retrieval": Pipeline(models["retrieval"], tokenizer),
    }


def test_every_input_kind_gives_the_same_caption(pipes, tmp_path):
    a = _image(0)
    path = tmp_path / "a.png"
    Image.fromarray(a).save(path)
    inputs = [
        str(path),
        path,
        Image.fromarray(a),
        a,
        torch.from_numpy(a),  # HWC uint8
        torch.from_numpy(a).permute(2, 0, 1),  # CHW uint8
        torch.from_numpy(a).permute(2, 0, 1).float() / 255,  # CHW float in [0, 1]
    ]
    results = [pipes["caption"].caption(x) for x in inputs]
    assert all(isinstance(r, str) for r in results)
    assert len(set(results)) == 1, results


def test_grey_rgba_palette_are_converted_to_rgb(pipes):
    rgb = Image.fromarray(_image(1))
    grey = rgb.convert("L")
    pipe = pipes["caption"]
    assert pipe.caption(grey) == pipe.caption(grey.convert("RGB"))
    assert pipe.caption(np.asarray(grey)) == pipe.caption(grey.convert("RGB"))  # HW array
    assert pipe.caption(rgb.convert("RGBA")) == pipe.caption(rgb)  # alpha dropped (opaque)
    palette = rgb.convert("P")
    assert pipe.caption(palette) == pipe.caption(palette.convert("RGB"))


def test_caption_batch_equals_singles(pipes):
    images = [_image(s) for s in range(3)]
    pipe = pipes["caption"]
    batch = pipe.caption(images)
    assert batch == [pipe.caption(x) for x in images]
    assert pipe.caption(np.stack(images)) == batch  # a 4-D array is a batch
    assert len(set(batch)) > 1  # the images are told apart
    small = Pipeline(pipe.model, pipe.tokenizer, max_length=6, min_length=2, beam_size=3, batch_size=2)
    assert small.caption(images) == batch  # chunked


def test_caption_methods_and_prompt(pipes, tokenizer):
    pipe = pipes["caption"]
    img = _image(4)
    greedy = pipe.caption(img, method="greedy")
    assert pipe.caption(img, method="greedy") == greedy
    assert pipe.caption(img, method="sample", seed=3) == pipe.caption(img, method="sample", seed=3)
    assert pipe.caption(img, method="sample", top_k=1) == greedy  # top-1 sampling is greedy
    # The prompt conditions the decoder and is not repeated in the output.
    with_prompt = pipe.caption(img, prompt="a picture of", method="greedy")
    x = pipe._pixels([Image.fromarray(img)])
    prompt = torch.tensor([tokenizer.encode("a picture of")[:-1]])
    out = caption_generate(pipe.model, x, prompt, method="greedy", max_length=6, min_length=2)
    assert with_prompt == tokenizer.decode(out.ids[0, 0, prompt.shape[1] :])
    with pytest.raises(ValueError, match="method"):
        pipe.caption(img, method="nucleus")


def test_vqa_batch_equals_singles_and_broadcasts(pipes):
    pipe = pipes["vqa"]
    images = [_image(s) for s in range(3)]
    questions = ["what color is the square?", "how many?", "is it red"]
    batch = pipe.answer(images, questions)
    assert batch == [pipe.answer(i, q) for i, q in zip(images, questions)]
    assert len(set(batch)) > 1  # the inputs are told apart
    one_question = pipe.answer(images, "what is it?")
    assert one_question == [pipe.answer(i, "what is it?") for i in images]
    assert pipe.answer(images[0], questions) == [pipe.answer(images[0], q) for q in questions]
    with pytest.raises(ValueError, match="3 images and 2 questions"):
        pipe.answer(images, questions[:2])


def test_vqa_answer_list(models, tokenizer):
    answers = ["yes", "no", "red", "two squares"]
    pipe = Pipeline(models["vqa"], tokenizer, answer_list=answers, k_test=3)
    out = pipe.answer([_image(0), _image(1)], "what is it?")
    assert all(a in answers for a in out)


def test_grounding_boxes(pipes):
    pipe = pipes["grounding"]
    images = [_image(0, (40, 56)), _image(1, (64, 32))]
    boxes = pipe.ground(images, ["the red block", "the left one"])
    assert boxes == [pipe.ground(images[0], "the red block"), pipe.ground(images[1], "the left one")]
    for box, img in zip(boxes, images):
        h, w = img.shape[:2]
        assert len(box) == 4 and 0 <= box[0] <= box[2] <= w and 0 <= box[1] <= box[3] <= h


def test_rank_returns_score_matrices(pipes):
    scores = pipes["retrieval"].rank([_image(0), _image(1)], ["a", "b c", "d e f"], k=2)
    assert scores.i2t.shape == (2, 3) and scores.t2i.shape == (3, 2) and scores.itc.shape == (2, 3)
    assert ((scores.i2t == -100).sum(dim=1) == 1).all()  # 3 texts, top 2 scored


def test_errors(pipes, tmp_path):
    vqa = pipes["vqa"]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.jpg"):
        vqa.answer(str(bad), "what?")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        vqa.answer(str(tmp_path / "missing.png"), "what?")
    with pytest.raises(ValueError, match="question is empty"):
        vqa.answer(_image(0), "   ")
    with pytest.raises(ValueError, match="question 1 is empty"):
        vqa.answer(_image(0), ["ok?", ""])
    with pytest.raises(ValueError, match="channels"):
        vqa.answer(np.zeros((8, 8, 5), dtype=np.uint8), "what?")
    with pytest.raises(ValueError, match="shape"):
        vqa.answer(np.zeros((1, 2, 8, 8, 3), dtype=np.uint8), "what?")
    with pytest.raises(ValueError, match="image 1 of the batch"):
        vqa.answer([_image(0), np.zeros((4, 4, 7), dtype=np.uint8)], "what?")
    with pytest.raises(TypeError, match="'caption' model"):
        vqa.caption(_image(0))
    with pytest.raises(ValueError, match="unknown pipeline task"):
        mplug_fast.pipeline("segmentation", config="tiny")
    with pytest.raises(ValueError, match="config="):
        mplug_fast.pipeline("vqa")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mplug_fast.pipeline("vqa", tmp_path / "nowhere")


def test_overlong_text_is_truncated_with_a_warning(pipes):
    vqa = pipes["vqa"]
    long_question = "is " + " ".join(["the red square"] * 20) + "?"
    with pytest.warns(UserWarning, match="truncated to 25"):
        out = vqa.answer(_image(0), long_question)
    assert isinstance(out, str)


def test_random_weights_warn_and_dtype(caplog):
    with caplog.at_level(logging.WARNING):
        pipe = mplug_fast.pipeline("caption", config="tiny", dtype="bfloat16", max_length=3, min_length=1)
    assert "RANDOM weights" in caplog.text
    assert pipe.dtype == torch.bfloat16
    assert isinstance(pipe.caption(_image(0)), str)


def test_pipeline_from_save_pretrained(models, tmp_path):
    from mplug_fast.checkpoint import save_pretrained

    save_pretrained(models["grounding"], tmp_path / "g")
    model = mplug_fast.pipeline("grounding", tmp_path / "g").model
    for (name, p), q in zip(model.state_dict().items(), models["grounding"].state_dict().values()):
        assert torch.equal(p, q), name


def test_cuda_graph_option_reaches_beam_search(pipes, caplog):
    """Off CUDA, ``cuda_graph=True`` runs the same recorded-step discipline eagerly: same outputs, one log
    line; with a non-beam method it is refused."""
    images = [_image(s) for s in range(2)]
    beam_module._log_no_graphs.cache_clear()  # logged once per process: an earlier test may have logged it
    with caplog.at_level(logging.INFO):
        assert pipes["caption"].caption(images, cuda_graph=True) == pipes["caption"].caption(images)
        assert pipes["vqa"].answer(images, "what is it?", cuda_graph=True) == pipes["vqa"].answer(
            images, "what is it?"
        )
    assert any("cuda_graph" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="cuda_graph"):
        pipes["caption"].caption(images[0], method="greedy", cuda_graph=True)
