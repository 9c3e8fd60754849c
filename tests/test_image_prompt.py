"""A photo as the prompt: CLIP image features as the conditional embeddings (sdstream.clip, image-prompt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

import sdstream
from sdstream.cli import app
from sdstream.errors import BadInput
from sdstream.inputs import load_inputs
from sdstream.models import clip
from sdstream.request import GenerationRequest

from conftest import json_lines

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "examples" / "photo.png"


@pytest.fixture(scope="module")
def other_photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "square.png"
    image = Image.new("RGB", (48, 64), (30, 160, 60))
    ImageDraw.Draw(image).rectangle((8, 20, 40, 52), fill=(220, 30, 30))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Two whole CLIPModels (text and vision towers) saved as folders: one fits tiny (64), one doesn't (48)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folders = {}
    for width in (64, 48):
        config = CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                             pad_token_id=1),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8),
            projection_dim=width,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(width)
            model = CLIPModel(config)
        folder = tmp_path_factory.mktemp(f"clip{width}")
        model.save_pretrained(folder)
        CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
        folders[width] = folder
    return folders


def run(pipe, **kw) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Final pixels and the encoder_hidden_states of every UNet call."""
    states = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: states.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        image = sdstream.generate(GenerationRequest(**{"model": "tiny", "device": "cpu", "steps": 3, "seed": 3, **kw}))
    finally:
        hook.remove()
    return np.asarray(image, dtype=np.int16), states


def test_same_photo_same_pixels_different_photo_different(tiny, other_photo):
    a, _ = run(tiny, prompt_image=str(PHOTO))
    b, _ = run(tiny, prompt_image=str(PHOTO))
    c, _ = run(tiny, prompt_image=str(other_photo))
    text, _ = run(tiny)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, text)


def test_unet_gets_clip_image_features_repeated_over_the_token_positions(tiny):
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    from sdstream.models.registry import tiny_path

    _, states = run(tiny, prompt_image=str(PHOTO), negative_prompt="green", steps=2)
    assert len(states) == 2 and all(torch.equal(s, states[0]) for s in states)
    uncond, cond = states[0].chunk(2)

    # Computed here with transformers alone, from the tiny folder's image_encoder and feature_extractor.
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_path() / "image_encoder", dtype=torch.float32).eval()
    processor = CLIPImageProcessorPil.from_pretrained(tiny_path() / "feature_extractor")
    with torch.no_grad():
        pixels = processor(images=Image.open(PHOTO).convert("RGB"), return_tensors="pt")["pixel_values"]
        features = encoder(pixel_values=pixels).image_embeds
    positions = tiny.tokenizer.model_max_length
    assert features.shape == (1, 64) and cond.shape == (1, positions, 64)
    torch.testing.assert_close(cond, features[:, None, :].expand(1, positions, 64), rtol=1e-5, atol=1e-6)

    # The unconditional half is still the negative prompt's text embedding.
    with torch.no_grad():
        _, text_uncond = tiny.encode_prompt("", "cpu", 1, True, "green")
    assert torch.equal(uncond, text_uncond)


def test_a_whole_clip_model_folder_uses_get_image_features(tiny, clips):
    from transformers import CLIPImageProcessorPil, CLIPModel

    _, states = run(tiny, prompt_image=str(PHOTO), clip_model=str(clips[64]), steps=1)
    cond = states[0].chunk(2)[1]
    model = CLIPModel.from_pretrained(clips[64]).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(clips[64])(images=Image.open(PHOTO).convert("RGB"),
                                                              return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
    features = features if torch.is_tensor(features) else features.pooler_output
    torch.testing.assert_close(cond, features[:, None, :].expand_as(cond), rtol=1e-5, atol=1e-6)
    # loaded once, cached by (source, device, dtype)
    assert clip.embedder_for(tiny, str(clips[64])) is clip.embedder_for(tiny, str(clips[64]))


def test_image_weight_blends_image_and_text(tiny):
    kw = dict(prompt="a red circle", negative_prompt="blue", steps=1)
    _, [image] = run(tiny, prompt_image=str(PHOTO), **kw)
    _, [text] = run(tiny, **kw)
    _, [blend] = run(tiny, prompt_image=str(PHOTO), image_weight=0.5, **kw)
    uncond = text.chunk(2)[0]
    assert torch.equal(image.chunk(2)[0], uncond) and torch.equal(blend.chunk(2)[0], uncond)
    assert torch.equal(blend.chunk(2)[1], 0.5 * image.chunk(2)[1] + (1 - 0.5) * text.chunk(2)[1])
    _, [zero] = run(tiny, prompt_image=str(PHOTO), image_weight=0.0, **kw)
    assert torch.allclose(zero, text)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(prompt_image=str(PHOTO), image_weight=1.5), "--image-weight 1.5"),
        (dict(image_weight=0.5), "--image-weight applies only with --prompt-image"),
        (dict(clip_model="tiny"), "--clip-model applies only with --prompt-image"),
        (dict(prompt_image="no-such-photo.png"), "--prompt-image 'no-such-photo.png': no such file"),
    ],
)
def test_request_validation(kw, message):
    with pytest.raises(BadInput, match=message):
        load_inputs(GenerationRequest(model="tiny", **kw).validated())


def cli(*args: str):
    return CliRunner().invoke(app, [*args, "--model", "tiny", "--device", "cpu", "--steps", "2", "--seed", "5"])


def test_a_clip_of_the_wrong_width_is_refused_before_the_run_folder(tiny, clips, tmp_path):
    out = tmp_path / "run"
    result = cli("image-prompt", str(PHOTO), "--clip-model", str(clips[48]), "-o", str(out))
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert "48-wide image embeddings" in line and "cross-attention is 64 wide" in line and "--clip-model tiny" in line
    assert not out.exists()


def test_an_uncached_hub_clip_offline_is_a_clear_runtime_error(tiny, tmp_path):
    out = tmp_path / "run"
    result = cli("image-prompt", str(PHOTO), "--clip-model", "sdstream-tests/no-such-clip", "-o", str(out))
    assert result.exit_code == 1, result.output
    assert "CLIP model 'sdstream-tests/no-such-clip' is not on disk and HF_HUB_OFFLINE is set" in result.stderr
    assert "--clip-model" in result.stderr.splitlines()[-1] and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["image-prompt", "generate"])
@pytest.mark.parametrize("kind", ["missing", "not an image", "truncated"])
def test_bad_photo_is_one_line_exit_2(command, kind, tmp_path):
    photo = tmp_path / "photo.png"
    if kind == "not an image":
        photo.write_text("not a picture\n")
    elif kind == "truncated":
        photo.write_bytes(PHOTO.read_bytes()[:120])
    args = [str(photo)] if command == "image-prompt" else ["--prompt-image", str(photo)]
    result = cli(command, *args, "-o", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and str(photo) in line
    why = {"missing": "no such file", "not an image": "is not an image", "truncated": "corrupt or truncated"}[kind]
    assert why in line
    assert not (tmp_path / "run").exists()


def test_generate_prompt_image_is_image_prompt(tiny, tmp_path):
    a = cli("image-prompt", str(PHOTO), "-q", "-o", str(tmp_path / "a"))
    b = cli("generate", "--prompt-image", str(PHOTO), "-q", "-o", str(tmp_path / "b"))
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    pixels = [np.asarray(Image.open(tmp_path / run / "final.png")) for run in ("a", "b")]
    assert np.array_equal(*pixels)
    requests = [json.loads((tmp_path / run / "run.json").read_text())["request"] for run in ("a", "b")]
    assert requests[0] == requests[1] and requests[0]["prompt_image"] == str(PHOTO)


def test_image_prompt_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "image-prompt", "examples/photo.png", "--model", "tiny", "--steps", "3", "--seed", "2", "--json", "-o",
        str(out)])
    assert result.exit_code == 0, result.output
    events = json_lines(result.stdout)
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3] and events[-1]["event"] == "done"
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["request"]["prompt_image"] == "examples/photo.png"
    assert manifest["request"]["image_weight"] == 1.0 and manifest["request"]["clip_model"] is None
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["step-0001.png", "step-0002.png", "step-0003.png"]
    assert Image.open(out / "final.png").size == (32, 32)
