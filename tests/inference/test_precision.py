"""The machine-chosen inference dtype and the opt-in int8 decoder."""

import copy
import subprocess
import sys

import pytest
import torch
from PIL import Image

import mplug_fast
from mplug_fast.inference import precision
from mplug_fast.inference.generate import caption_generate
from mplug_fast.inference.precision import CPU_DTYPE_ENV, QuantizedLMHead, auto_dtype, quantize_decoder
from mplug_fast.tasks import get_task


@pytest.mark.parametrize(("feature", "expected"), [("AMX", torch.bfloat16), (None, torch.float32)])
def test_auto_dtype_follows_native_bf16(monkeypatch, feature, expected) -> None:
    monkeypatch.delenv(CPU_DTYPE_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: feature)
    assert auto_dtype("cpu") == expected
    assert auto_dtype(torch.device("cuda", 0)) is None  # a GPU keeps the checkpoint's dtype
    assert str(expected).removeprefix("torch.") in precision.describe_cpu_precision()


def test_env_forces_the_cpu_dtype_and_rejects_unknown_names(monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: None)
    monkeypatch.setenv(CPU_DTYPE_ENV, "bf16")
    assert auto_dtype("cpu") == torch.bfloat16
    assert "forced" in precision.describe_cpu_precision()
    monkeypatch.setenv(CPU_DTYPE_ENV, "int4")
    with pytest.raises(ValueError, match=f"{CPU_DTYPE_ENV}='int4'"):
        auto_dtype("cpu")


def test_pipeline_loads_in_the_auto_dtype(monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: "AVX-512 BF16")
    monkeypatch.delenv(CPU_DTYPE_ENV, raising=False)
    pipe = mplug_fast.pipeline("caption", config="tiny", max_length=3, min_length=1)
    assert pipe.dtype == torch.bfloat16
    assert mplug_fast.pipeline("caption", config="tiny", dtype=None).dtype == torch.float32  # the model's


def _caption_model():
    torch.manual_seed(0)
    model = get_task("caption").build_model(mplug_fast.get_config("tiny")).eval()
    for p in model.decoder.parameters():  # logits far apart, so that int8 noise rarely flips a token
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_int8_decoder_is_close_to_fp32_and_generates() -> None:
    model = _caption_model()
    q8 = quantize_decoder(copy.deepcopy(model))
    assert isinstance(q8.decoder.head, QuantizedLMHead)
    assert any("quantized" in type(m).__module__ for m in q8.decoder.modules())
    ids = torch.randint(1000, 2000, (2, 6))
    memory = torch.randn(2, 17, model.config.text.hidden_size)
    with torch.no_grad():
        ref = model.decoder(ids, memory=memory)
        out = q8.decoder(ids, memory=memory)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.05, rel  # int8 changes the logits, by little
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.9, agree
    images = torch.rand(2, 3, 224, 224)
    generated = caption_generate(q8, images, beam_size=3, max_length=6, min_length=2)
    assert generated.ids.shape[0] == 2


def test_int8_refuses_what_it_cannot_quantise() -> None:
    with pytest.raises(ValueError, match="no text decoder"):
        quantize_decoder(get_task("retrieval").build_model(mplug_fast.get_config("tiny")))
    with pytest.raises(ValueError, match="CPU float32"):
        quantize_decoder(_caption_model().to(torch.bfloat16))
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        mplug_fast.pipeline("caption", config="tiny", quantize="int4")


def test_predict_cli_quantize_and_info_line(tmp_path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    cmd = [sys.executable, "-m", "mplug_fast", "predict", "caption", str(image), "--config", "tiny"]
    run = subprocess.run([*cmd, "--quantize", "int8", "--max-length", "4"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    info = subprocess.run([sys.executable, "-m", "mplug_fast", "info"], capture_output=True, text=True)
    assert info.returncode == 0 and "inference dtype on cpu: float32" in info.stdout
