"""Synthetic inputs keep the example's structure; a model that raises on its inputs is one line, exit 2."""

from __future__ import annotations

import torch
from torch import nn

IMAGE_TOKEN = 99
PATCHES = 4


class ImageTokens(nn.Module):
    """A VLM in miniature: refuses inputs whose image-token count differs from its image features
    (PaliGemma: "Image features and image tokens do not match")."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.patch = nn.Linear(3, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, input_ids, pixel_values, attention_mask):
        tokens = self.embed(input_ids)
        features = self.patch(pixel_values.flatten(2).transpose(1, 2))  # (N, PATCHES, 16)
        slots = input_ids == IMAGE_TOKEN
        if int(slots.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"Image features and image tokens do not match, tokens: {int(slots.sum())}, "
                             f"features: {features.shape[0] * features.shape[1]}\n(second line of the message)")
        tokens = tokens.masked_scatter(slots[..., None], features)
        return self.out(tokens * attention_mask[..., None])


def image_tokens():
    from quantkit.models import LoadedModel

    ids = torch.tensor([[IMAGE_TOKEN] * PATCHES + [5, 17, 42, 8]])
    example = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 2, 2), "attention_mask": torch.ones_like(ids)}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ImageTokens().eval()
    return LoadedModel(spec=f"{__file__}:image_tokens", model=model, input_names=list(example),
                       output_names=["output"], example_inputs=example)


def broken_layout():
    loaded = image_tokens()
    loaded.example_inputs["input_ids"] = torch.tensor([[IMAGE_TOKEN, 5, 17, 42, 8, 1, 2, 3]])
    loaded.spec = f"{__file__}:broken_layout"
    return loaded


def test_synthetic_keeps_integer_inputs_and_randomizes_floats():
    from quantkit.calib import synthetic_set

    loaded = image_tokens()
    cs = synthetic_set(loaded, n=6, seed=0)
    assert cs.synthetic and len(cs) == 6
    pixels = []
    for s in cs:
        assert torch.equal(s.kwargs["input_ids"], loaded.example_inputs["input_ids"])
        assert torch.equal(s.kwargs["attention_mask"], loaded.example_inputs["attention_mask"])
        assert s.kwargs["pixel_values"].shape == (1, 3, 2, 2) and s.kwargs["pixel_values"].dtype == torch.float32
        pixels.append(s.kwargs["pixel_values"])
    assert not torch.equal(pixels[0], pixels[1]) and not torch.equal(pixels[0], loaded.example_inputs["pixel_values"])
    with torch.no_grad():  # every synthetic batch is one the model accepts
        for args, kwargs in cs.batches(3):
            assert loaded.model(*args, **kwargs).shape == (3, 8, 8)


def test_quantize_synthetic_on_image_token_layout(tmp_path, capsys):
    from quantkit.cli import main

    rc = main(["quantize", "--recipe", "fp8", "--model", f"{__file__}:image_tokens", "--synthetic",
               "--max-samples", "12", "--device", "cpu", "--out", str(tmp_path / "out"), "-q"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "report.json").is_file()


def test_model_that_raises_is_one_line_naming_model_and_inputs(tmp_path, capsys):
    from quantkit.cli import main

    rc = main(["quantize", "--recipe", "fp8", "--model", f"{__file__}:broken_layout", "--synthetic",
               "--max-samples", "12", "--device", "cpu", "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert "broken_layout" in line and "ImageTokens raised on" in line, line
    assert "input_ids int64[" in line and "pixel_values float32[" in line, line
    assert "ValueError: Image features and image tokens do not match, tokens: 1" in line, line
    assert "second line" not in line
    assert not (tmp_path / "out").exists()  # nothing written
