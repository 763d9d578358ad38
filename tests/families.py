"""Tiny random-weight models of the families people deploy, built in-process (nothing downloaded).

Each builder returns a `quantkit.models.LoadedModel` whose spec is `<this file>:<builder>`, so a
run folder made from it reloads the very same model (`load_quantized`, `export`). Weights come from
a fixed seed; example inputs are structurally valid (PaliGemma's image tokens, DiT's integer
timestep and class label). Shared by tests/test_families.py and scripts/family_matrix.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

HERE = Path(__file__).resolve()
VOCAB = 256
SEQ = 12


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build()
    return model.eval()


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _loaded(name: str, model: nn.Module, example: dict[str, torch.Tensor], outputs: list[str]):
    from quantkit.models import LoadedModel

    return LoadedModel(spec=f"{HERE}:{name}", model=model, input_names=list(example), output_names=outputs,
                       example_inputs=example, family=name)


def _text_example(batch: int = 2, seq: int = SEQ) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (batch, seq), generator=_gen())
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def _decoder_kwargs() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                pad_token_id=0)


# ---------------------------------------------------------------------------------------------
# transformers


def gemma():
    """Gemma decoder with tied input embedding / lm_head (the Gemma default)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(**_decoder_kwargs(), tie_word_embeddings=True)
    model = _seeded(lambda: GemmaForCausalLM(config))
    return _loaded("gemma", model, _text_example(), ["logits"])


def llama_tied():
    """Llama decoder with tie_word_embeddings=True."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_decoder_kwargs(), tie_word_embeddings=True)
    model = _seeded(lambda: LlamaForCausalLM(config))
    return _loaded("llama_tied", model, _text_example(), ["logits"])


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_decoder_kwargs(), tie_word_embeddings=False)
    model = _seeded(lambda: Qwen2ForCausalLM(config))
    return _loaded("qwen2", model, _text_example(), ["logits"])


def gpt2():
    """GPT-2 (Conv1D projections, fused c_attn, lm_head tied to wte)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=1)
    model = _seeded(lambda: GPT2LMHeadModel(config))
    return _loaded("gpt2", model, _text_example(), ["logits"])


def t5_encoder():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu")
    model = _seeded(lambda: T5EncoderModel(config))
    return _loaded("t5_encoder", model, _text_example(), ["last_hidden_state"])


def _siglip_vision_config():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, num_channels=3)


def _image_example(size: int = 32, batch: int = 2) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=_gen())}


def siglip_vision():
    """SigLIP vision tower with its attention-pooling head (an nn.MultiheadAttention + an MLP)."""
    from transformers import SiglipVisionModel

    config = _siglip_vision_config()
    config.vision_use_head = True
    model = _seeded(lambda: SiglipVisionModel(config))
    return _loaded("siglip_vision", model, _image_example(), ["last_hidden_state", "pooler_output"])


def vit():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8)
    model = _seeded(lambda: ViTModel(config, add_pooling_layer=False))
    return _loaded("vit", model, _image_example(), ["last_hidden_state"])


PALIGEMMA_IMAGE_TOKEN = VOCAB - 1


def paligemma():
    """PaliGemma: SigLIP vision tower -> linear projector -> Gemma decoder with tied embeddings."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration

    vision = _siglip_vision_config()
    text = GemmaConfig(**_decoder_kwargs(), tie_word_embeddings=True)
    config = PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             image_token_index=PALIGEMMA_IMAGE_TOKEN, vocab_size=VOCAB, projection_dim=64,
                             hidden_size=64, tie_word_embeddings=True)
    model = _seeded(lambda: PaliGemmaForConditionalGeneration(config))
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    text_ids = torch.randint(1, VOCAB - 1, (2, 6), generator=_gen())
    ids = torch.cat([torch.full((2, image_tokens), PALIGEMMA_IMAGE_TOKEN), text_ids], dim=1)
    example = {"input_ids": ids, "pixel_values": _image_example()["pixel_values"],
               "attention_mask": torch.ones_like(ids)}
    return _loaded("paligemma", model, example, ["logits"])


# ---------------------------------------------------------------------------------------------
# plain torch.nn


class ACTPolicy(nn.Module):
    """An ACT-style policy: image features + state -> nn.TransformerEncoder -> nn.TransformerDecoder
    over learned action queries -> a linear action head (LeRobot's ACT, reduced)."""

    def __init__(self, d: int = 64, state_dim: int = 14, chunk: int = 8, tokens: int = 10):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.ReLU(), nn.Conv2d(16, d, 2, stride=2))
        self.state_proj = nn.Linear(state_dim, d)
        self.pos = nn.Parameter(torch.randn(1, 1 + (32 // 8) ** 2, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        dec = nn.TransformerDecoderLayer(d, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(dec, num_layers=1)
        self.query = nn.Embedding(chunk, d)
        self.action_head = nn.Linear(d, state_dim)

    def forward(self, image: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(image).flatten(2).transpose(1, 2)  # (B, 16, d)
        tokens = torch.cat([self.state_proj(state)[:, None], feats], dim=1) + self.pos
        memory = self.encoder(tokens)
        queries = self.query.weight[None].expand(image.shape[0], -1, -1)
        return self.action_head(self.decoder(queries, memory))


def act_policy():
    model = _seeded(ACTPolicy)
    g = _gen()
    example = {"image": torch.randn(2, 3, 32, 32, generator=g), "state": torch.randn(2, 14, generator=g)}
    return _loaded("act_policy", model, example, ["actions"])


# ---------------------------------------------------------------------------------------------
# diffusers (wrapped the way users deploy them: one tensor in, one tensor out)


class VAEDecoder(nn.Module):
    """AutoencoderKL's decoder as deployed: latents -> image."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


def vae_decoder():
    from diffusers import AutoencoderKL

    vae = _seeded(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=16, sample_size=32))
    model = VAEDecoder(vae).eval()
    return _loaded("vae_decoder", model, {"z": torch.randn(1, 4, 8, 8, generator=_gen())}, ["image"])


class DiT(nn.Module):
    """DiTTransformer2DModel returning its `.sample` tensor."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.dit(hidden_states, timestep=timestep, class_labels=class_labels).sample


def dit():
    from diffusers import DiTTransformer2DModel

    net = _seeded(lambda: DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=10, norm_num_groups=4))
    g = _gen()
    example = {"hidden_states": torch.randn(2, 4, 8, 8, generator=g),
               "timestep": torch.tensor([3, 700]), "class_labels": torch.tensor([1, 7])}
    return _loaded("dit", DiT(net).eval(), example, ["sample"])


class UNet(nn.Module):
    """UNet2DConditionModel returning its `.sample` tensor."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states).sample


def unet():
    from diffusers import UNet2DConditionModel

    net = _seeded(lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16))
    g = _gen()
    example = {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 500]),
               "encoder_hidden_states": torch.randn(2, 6, 32, generator=g)}
    return _loaded("unet", UNet(net).eval(), example, ["sample"])


# name -> builder; TRANSFORMERS are the token/ViT transformer families the int8-smoothquant case runs on.
FAMILIES: dict[str, Callable] = {
    "gemma": gemma, "paligemma": paligemma, "siglip_vision": siglip_vision, "llama_tied": llama_tied,
    "qwen2": qwen2, "t5_encoder": t5_encoder, "vit": vit, "gpt2": gpt2, "act_policy": act_policy,
    "vae_decoder": vae_decoder, "dit": dit, "unet": unet,
}
TRANSFORMERS = ("gemma", "paligemma", "siglip_vision", "llama_tied", "qwen2", "t5_encoder", "vit", "gpt2",
                "act_policy", "dit")


# ---------------------------------------------------------------------------------------------
# One matrix case: quantize -> export (audit, ONNX Runtime reference), in-process through the CLI's
# own entry point so the exit codes are the ones a user gets.

RECIPES = ("fp8", "balanced", "fp16", "int8-smoothquant")
CALIBRATION_SAMPLES = 12  # --synthetic; 10 % held out (at least one sample)


# pi0 deploys PaliGemma on Thor: transformers' image-token merge exports a NonZero, which TensorRT-RTX
# lacks (the compile check fails it for RTX targets, naming the node) and Jetson TensorRT has.
EXPORT_ARGS: dict[str, list[str]] = {"paligemma": ["--target", "thor"]}


def recipes_for(family: str) -> tuple[str, ...]:
    return RECIPES if family in TRANSFORMERS else RECIPES[:3]


def _cli(argv: list[str]) -> tuple[int | str, str]:
    """Exit code of `quantkit ARGV` run in this process; a traceback is recorded as 'traceback'."""
    import contextlib
    import io
    import traceback

    from quantkit import cli, console

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(argv)
    except BaseException as e:  # noqa: BLE001 — a crash is a result of the matrix, not of the runner
        if isinstance(e, KeyboardInterrupt):
            raise
        return "traceback", "".join(traceback.format_exception_only(type(e), e)).strip()
    finally:
        console.set_quiet(False)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    return code, (lines[-1] if lines else "")


def run_case(family: str, recipe: str, out_dir: Path) -> dict:
    """Quantize `family` with `recipe` (synthetic calibration, CPU) into out_dir, export it, and read back
    the exit codes, the held-out cosine, the audit and the per-block ONNX Runtime cosines."""
    import json
    from collections import Counter

    spec = f"{HERE}:{family}"
    row: dict = {"family": family, "recipe": recipe}
    row["quantize"], row["quantize_message"] = _cli(
        ["quantize", "--model", spec, "--recipe", recipe, "--synthetic", "--max-samples", str(CALIBRATION_SAMPLES),
         "--device", "cpu", "--out", str(out_dir), "-q"])
    report_path = out_dir / "report.json"
    if row["quantize"] not in (0, 1) or not report_path.is_file():
        return row
    report = json.loads(report_path.read_text())
    row["cosine"] = min(m["cosine"] for m in report["metrics"]["fake-quant"].values())
    # The folder is ours: its model spec (this file) may run again. Export runs the TensorRT-RTX compile
    # check where it is installed (the test extra), so a graph a strongly typed build refuses fails here.
    row["export"], row["export_message"] = _cli(["export", "--from", str(out_dir), "--trust-model-code", "-q",
                                                 *EXPORT_ARGS.get(family, [])])
    audit_path = out_dir / "audit.json"
    if audit_path.is_file():
        audit = json.loads(audit_path.read_text())
        row["violations"] = audit["violations"]
        row["audit_counts"] = audit["counts"]
    report = json.loads(report_path.read_text())
    check = report.get("compile_check") or {}
    row["compile"] = {", ".join(t["sm"] for t in r["targets"]): {k: r[k] for k in ("parsed", "built", "engine_bytes", "not_checked")}
                      for r in check.get("targets") or []}
    row["compile_verdict"] = check.get("verdict")
    per_block = report.get("onnxruntime_vs_fake_quant_per_block") or {}
    row["ort_per_block"] = {k: v["cosine"] for k, v in per_block.items()}
    row["ort_end_to_end"] = {k: v["cosine"] for k, v in (report.get("onnxruntime_vs_fake_quant") or {}).items()}
    plan = json.loads((out_dir / "plan.json").read_text())
    row["plan"] = plan
    row["roles"] = dict(sorted(Counter(layer["role"] or "?" for layer in plan["layers"]).items()))
    # Layers the model never calls (the VAE's encoder half under decode()) keep the model's dtype whatever
    # a plain-dtype rule says (layer_dtype.apply_layer_dtypes notes why): counted apart.
    uncalled = [layer for layer in plan["layers"] if "without calling" in (layer.get("note") or "")]
    row["not_called"] = sorted(layer["name"] for layer in uncalled)
    by_role: dict[str, set] = {}
    for layer in plan["layers"]:
        if layer not in uncalled:
            by_role.setdefault(layer["role"] or "?", set()).add(layer["precision"])
    row["precision_by_role"] = {k: sorted(v) for k, v in sorted(by_role.items())}
    row["protections"] = sorted({p["op"] for p in plan["protected"]})
    row["attention_converted"] = sum(1 for a in plan.get("attention") or [] if a.get("converted"))
    return row
