"""Layer roles: what each Linear / Conv / Embedding of a model does, read from the model's structure.

`infer_roles(model, example)` finds attention q/k/v/o (or fused qkv), MLP gate/up/down, output
heads, embeddings, modality projectors, timestep/conditioning layers and convs, and records how each
was inferred. Structure first: attention sites (quantkit.attention), which linears read the very
same tensor in one probe forward, call order, which linears read what an attention computed
(quantkit.attention_flow: so a site that is a whole block keeps its MLP), which layer's output is
the model's output, weights tied to an embedding, which layers do not depend on the model's main
input (conditioning), the classes of the parents; names only as a fallback. Recipes select layers by these roles (`roles:`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import weakref
from typing import Any, Callable, Mapping

import torch
from torch import nn

from quantkit.attention_flow import AttentionFlow
from quantkit.layers import iter_layers, layer_kind
from quantkit.recipe import ROLE_GROUPS, ROLES

__all__ = ["ROLES", "ROLE_GROUPS", "LayerRole", "infer_roles"]


@dataclasses.dataclass(frozen=True)
class LayerRole:
    role: str | None  # one of ROLES; None: not inferred
    how: str  # what in the model's structure (or, failing that, its name) said so

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "how": self.how}


def _features(module: nn.Module) -> tuple[int | None, int | None]:
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    w = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and w is not None:  # transformers' GPT-2 Conv1D stores (in, out)
        return int(w.shape[0]), int(w.shape[1])
    return None, None


# ---------------------------------------------------------------------------------------------
# The probe forward: who is called when, with which tensor


@dataclasses.dataclass
class _Call:
    name: str
    order: int
    input: Any  # weakref to the first tensor argument (identity: "reads the very same tensor")
    output: Any  # weakref to the output tensor
    fingerprint: tuple[float, float] | None = None
    reads_attention: str | None = None  # the site whose attention computed its input (quantkit.attention_flow)


@dataclasses.dataclass
class _Span:
    start: int
    end: int
    inputs: list[Any]  # weakrefs of the tensors passed in
    outputs: list[Any]  # weakrefs of the tensors returned


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name, None))]
    return []


def _ref(t: torch.Tensor | None) -> Any:
    return weakref.ref(t) if isinstance(t, torch.Tensor) else (lambda: None)


def _fingerprint(t: torch.Tensor | None) -> tuple[float, float] | None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return None
    x = t.detach().double()
    return float(x.sum()), float((x * x).sum())


@dataclasses.dataclass
class _Probe:
    calls: dict[str, _Call]  # first call of each layer
    sites: dict[str, _Span]
    blocks: dict[str, _Span]
    outputs: list[Any]  # weakrefs of the model's output tensors
    alive: list[Any]  # keeps the recorded tensors alive until the roles are read
    # site -> linear-call counts at each attention output it computed; a site absent: none seen
    # (an attention kernel quantkit.attention_flow does not know, or no flow tracked)
    attention_at: dict[str, list[int]] = dataclasses.field(default_factory=dict)


def _needs_grad_for_module_calls(model: nn.Module) -> bool:
    # torch.nn's MultiheadAttention / TransformerEncoderLayer take a fused fast path without grad,
    # which calls none of their Linear children: run the probe on the slow path.
    return any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
               for m in model.modules())


def _run(model: nn.Module, example: Mapping[str, Any]) -> Any:
    if _needs_grad_for_module_calls(model):
        with torch.enable_grad():
            out = model(**example)
        return out
    with torch.no_grad():
        return model(**example)


def _probe(model: nn.Module, example: Mapping[str, Any], layers: dict[str, nn.Module], sites: list[str],
           blocks: list[str], flow: bool = False) -> _Probe:
    """One forward with hooks. `flow`: also follow what each attention site computed (AttentionFlow)."""
    calls: dict[str, _Call] = {}
    spans: dict[str, dict[str, _Span]] = {"sites": {}, "blocks": {}}
    counter = [0]
    alive: list[Any] = []
    handles = []
    running: list[str] = []  # the attention sites whose forward is running, innermost last
    tracker = AttentionFlow(lambda: running[-1] if running else None, lambda: counter[0]) if flow and sites else None
    untracked = tracker.paused if tracker is not None else contextlib.nullcontext

    def pre(name: str):
        def hook(module, args, kwargs):
            x = next(iter(_tensors(args) or _tensors(kwargs)), None)
            counter[0] += 1
            if name not in calls:
                with untracked():
                    calls[name] = _Call(name, counter[0], _ref(x), _ref(None), _fingerprint(x),
                                        tracker.attention_output_of(x) if tracker is not None else None)
                alive.append(x)
        return hook

    def post(name: str):
        def hook(module, args, kwargs, output):
            call = calls.get(name)
            if call is not None and call.output() is None:
                out = next(iter(_tensors(output)), None)
                call.output = _ref(out)
                alive.append(out)
        return hook

    def span_pre(kind: str, name: str):
        def hook(module, args, kwargs):
            if kind == "sites":
                running.append(name)
            if name not in spans[kind]:
                ins = _tensors(args) + _tensors(kwargs)
                alive.extend(ins)
                spans[kind][name] = _Span(counter[0] + 1, -1, [_ref(t) for t in ins], [])
        return hook

    def span_post(kind: str, name: str):
        def hook(module, args, kwargs, output):
            if kind == "sites" and running and running[-1] == name:
                running.pop()
            span = spans[kind].get(name)
            if span is not None and span.end < 0:
                span.end = counter[0]
                outs = _tensors(output)
                alive.extend(outs)
                span.outputs = [_ref(t) for t in outs]
        return hook

    modules = dict(model.named_modules())
    for name, m in layers.items():
        handles += [m.register_forward_pre_hook(pre(name), with_kwargs=True),
                    m.register_forward_hook(post(name), with_kwargs=True)]
    for kind, names in (("sites", sites), ("blocks", blocks)):
        for name in names:
            m = modules[name]
            handles += [m.register_forward_pre_hook(span_pre(kind, name), with_kwargs=True),
                        m.register_forward_hook(span_post(kind, name), with_kwargs=True)]
    try:
        with tracker if tracker is not None else contextlib.nullcontext():
            result = _run(model, example)
    finally:
        for h in handles:
            h.remove()
    outs = _tensors(result)
    alive.extend(outs)
    return _Probe(calls, spans["sites"], spans["blocks"], [_ref(t) for t in outs], alive,
                  dict(tracker.computed_at) if tracker is not None else {})


def _main_float_input(example: Mapping[str, Any]) -> str | None:
    floats = {k: v for k, v in example.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if len(example) < 2 or not floats:
        return None
    return max(floats, key=lambda k: floats[k].numel())


def _independent_of(model: nn.Module, example: Mapping[str, Any], key: str, layers: dict[str, nn.Module],
                    first: _Probe) -> set[str]:
    """Layers whose input does not change when the main input `key` does: they read only the other
    inputs (a timestep, a class label, a state vector), i.e. they condition the main stream."""
    x = example[key]
    perturbed = dict(example)
    perturbed[key] = x + (x.detach().float().std() + 1.0).to(x.dtype) * torch.ones_like(x) * 0.5
    second = _probe(model, perturbed, layers, [], [])
    same = set()
    for name, call in first.calls.items():
        other = second.calls.get(name)
        if call.fingerprint is None or other is None or other.fingerprint is None:
            continue
        if all(abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-30) for a, b in zip(call.fingerprint, other.fingerprint)):
            same.add(name)
    return same


# ---------------------------------------------------------------------------------------------
# Names, the fallback

_NAME_RULES: list[tuple[str, str]] = [
    (r"(^|\.)(lm_head|classifier|score)$", "head"),
    (r"(multi_modal_projector|mm_projector|mm_proj|projector)(\.|$)", "projector"),
    (r"(time_embed|timestep|t_embedder|time_emb_proj|adaln|ada_norm|emb\.|time_proj)", "conditioning"),
    (r"(^|\.)(qkv|qkv_proj|c_attn|query_key_value|wqkv|in_proj)$", "attention_qkv"),
    (r"(^|\.)(q_proj|query|to_q|q|wq)$", "attention_q"),
    (r"(^|\.)(k_proj|key|to_k|k|wk)$", "attention_k"),
    (r"(^|\.)(v_proj|value|to_v|v|wv)$", "attention_v"),
    (r"(^|\.)(o_proj|out_proj|to_out(\.0)?|wo)$", "attention_out"),
    (r"(attn|attention)\S*\.(dense|c_proj|proj|o)$", "attention_out"),
    (r"(^|\.)(gate_up_proj)$", "mlp_gate_up"),
    (r"(^|\.)(gate_proj|w1|wi_0)$", "mlp_gate"),
    (r"(^|\.)(up_proj|fc1|c_fc|wi|wi_1|w3|linear1|intermediate\.dense|fc_in)$", "mlp_up"),
    (r"(^|\.)(down_proj|fc2|w2|linear2|fc_out)$", "mlp_down"),
    (r"(mlp|ffn|feed_forward|ff)\S*\.(c_proj|wo|dense|proj)$", "mlp_down"),
    (r"(^|\.)output\.dense$", "mlp_down"),
    (r"(^|\.)head$", "head"),
]


_MLP_CONTAINER = re.compile(r"^(.*?(?:^|\.)(?:mlp|ffn|ff|feed_forward|experts|mlp_\w+|ffn_\w+))\.")


def _role_from_name(name: str) -> str | None:
    low = name.lower()
    for pattern, role in _NAME_RULES:
        if re.search(pattern, low):
            return role
    return None


# ---------------------------------------------------------------------------------------------
# Structure


def _blocks(model: nn.Module, site_names: list[str]) -> list[str]:
    """Entries of a ModuleList/Sequential that hold an attention or at least two linears: the blocks
    of a transformer (or of any stacked network), innermost first is not needed — all are listed."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        for child_name, child in m.named_children():
            full = f"{name}.{child_name}" if name else child_name
            has_site = any(s == full or s.startswith(full + ".") for s in site_names)
            linears = sum(1 for sub in child.modules() if layer_kind(sub) == "linear")
            if has_site or linears >= 2:
                out.append(full)
    return out


def _inside(name: str, scope: str) -> bool:
    return scope == "" or name.startswith(scope + ".")


def _tied_to_embedding(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    embeddings = {id(m.weight): n for n, m in layers.items()
                  if layer_kind(m) == "embedding" and isinstance(getattr(m, "weight", None), torch.Tensor)}
    return {n: embeddings[id(m.weight)] for n, m in layers.items()
            if layer_kind(m) == "linear" and isinstance(getattr(m, "weight", None), torch.Tensor)
            and id(m.weight) in embeddings}


def _is_output(probe: _Probe, call: _Call | None) -> bool:
    out = call.output() if call is not None else None
    if out is None:
        return False
    for ref in probe.outputs:
        t = ref()
        if t is None:
            continue
        if t is out:
            return True
        try:
            if t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() and t.numel() <= out.numel():
                return True
        except RuntimeError:
            continue
    return False


def _attention_roles(site: str, site_module: nn.Module, inside: list[str], probe: _Probe | None,
                     layers: dict[str, nn.Module], roles: dict[str, LayerRole]) -> None:
    where = f"in attention {site or '(root)'} ({type(site_module).__name__})"
    if isinstance(site_module, nn.MultiheadAttention):
        for n in inside:
            if n == f"{site}.out_proj" if site else n == "out_proj":
                roles[n] = LayerRole("attention_out", f"output projection of nn.MultiheadAttention {site or '(root)'}")
    called = [n for n in inside if probe is not None and n in probe.calls and n not in roles]
    called.sort(key=lambda n: probe.calls[n].order)
    if not called:
        return
    span = probe.sites.get(site)
    site_inputs = {id(t) for t in (r() for r in (span.inputs if span else [])) if t is not None}
    # When the probe saw the attention compute (quantkit.attention_flow), its projections are the linears
    # called before that, and its output projection the ones reading what it computed; linears called
    # after it that read anything else (a whole-block site's MLP, fed by the residual stream) are left to
    # the rules below. Without that, every linear of the site that is no input projection is taken for
    # its output projection.
    at = probe.attention_at.get(site)
    before = [n for n in called if not at or probe.calls[n].order <= at[0]]
    after = [n for n in called if at and probe.calls[n].order > at[0]]
    # runs of consecutive calls that read the very same tensor
    groups: list[list[str]] = []
    for n in before:
        x = probe.calls[n].input()
        if groups and x is not None and probe.calls[groups[-1][-1]].input() is x:
            groups[-1].append(n)
        else:
            groups.append([n])
    inputs, outs = [], []
    for g in groups:
        x = probe.calls[g[0]].input()
        if len(g) > 1 or (x is not None and id(x) in site_inputs):
            inputs += g
        else:
            outs += g
    if len(inputs) == 3:
        for n, role in zip(inputs, ("attention_q", "attention_k", "attention_v")):
            roles[n] = LayerRole(role, f"{where}: {role[-1]} of the projections called in order q, k, v "
                                       f"({'one input' if len(groups[0]) == 3 else 'query input, then key/value input'})")
    elif len(inputs) == 1:
        n = inputs[0]
        fin, fout = _features(layers[n])
        if fin and fout and fout >= 2 * fin:
            roles[n] = LayerRole("attention_qkv", f"{where}: the one projection of the attention's input "
                                                  f"({fin} -> {fout}: fused q/k/v)")
    else:
        for n in inputs:
            role = _role_from_name(n)
            if role and role.startswith("attention_"):
                roles[n] = LayerRole(role, f"{where}: input projection; which one by its name")
            elif at:
                # it reads the site's input before the attention computed: an input projection whatever it
                # is called (DeepSeek's q_a_proj / kv_a_proj_with_mqa); which of q/k/v it feeds is unknown
                roles[n] = LayerRole("attention_qkv", f"{where}: one of {len(inputs)} projections of the "
                                                      "attention's input (which of q/k/v not inferred)")
    if not at:
        for n in outs:
            roles[n] = LayerRole("attention_out", f"{where}: no q/k/v projection (the probe did not see the "
                                                  "attention compute: every other linear of the site is taken for "
                                                  "its output projection)")
        return
    for n in outs:
        # before the attention, yet no projection of its input: a projection of a projection (DeepSeek's
        # low-rank q_b_proj / kv_b_proj); attention by where it runs, which one by its name when it says
        role = _role_from_name(n)
        roles[n] = (LayerRole(role, f"{where}: projects another projection before the attention; which one by "
                                    "its name") if role and role.startswith("attention_") else
                    LayerRole("attention_qkv", f"{where}: called before the attention computed, reading another "
                                               "projection's output (a low-rank q/k/v pair; which one not inferred)"))
    readers = [n for n in after if probe.calls[n].reads_attention == site]
    for n in readers:
        roles[n] = LayerRole("attention_out", f"{where}: reads the attention's output (through reshapes and casts)")
    if not readers:  # what it computed reached no linear through ops attention_flow follows
        for n in after:
            roles[n] = LayerRole("attention_out", f"{where}: called after the attention computed (no linear reads "
                                                  "its output through reshapes and casts alone)")


def _mlp_roles(order: list[str], layers: dict[str, nn.Module], probe: _Probe, roles: dict[str, LayerRole],
               block_of: Callable[[str], str | None]) -> None:
    """up (and gate) d -> h, then down h -> d in call order within one block: an MLP, whatever its names."""
    free = [n for n in order if n not in roles and layer_kind(layers[n]) == "linear"]
    used: set[str] = set()
    for i, up in enumerate(free):
        if up in used:
            continue
        fin, fout = _features(layers[up])
        if not fin or not fout or fout <= fin:
            continue
        sibling = None
        if i + 1 < len(free):
            nxt = free[i + 1]
            x = probe.calls[up].input()
            if (x is not None and probe.calls[nxt].input() is x and _features(layers[nxt]) == (fin, fout)
                    and block_of(nxt) == block_of(up)):
                sibling = nxt
        for down in free[i + 1 + (1 if sibling else 0):]:
            if down in used or block_of(down) != block_of(up):
                continue
            din, dout = _features(layers[down])
            if dout == fin and din in (fout, fout // 2):
                where = f"block {block_of(up) or '(root)'}" if block_of(up) is not None else "the model"
                shape = f"{fin} -> {fout} ... {din} -> {dout}"
                if sibling:
                    roles[up] = LayerRole("mlp_gate", f"MLP in {where}: first of two projections of one input "
                                                      f"({shape})")
                    roles[sibling] = LayerRole("mlp_up", f"MLP in {where}: second of two projections of one input "
                                                         f"({shape})")
                    used.add(sibling)
                elif din == fout // 2 and din != fout:
                    roles[up] = LayerRole("mlp_gate_up", f"MLP in {where}: expands to gate and up halves ({shape})")
                else:
                    roles[up] = LayerRole("mlp_up", f"MLP in {where}: expands the hidden size ({shape})")
                roles[down] = LayerRole("mlp_down", f"MLP in {where}: projects back to the hidden size ({shape})")
                used |= {up, down}
                break


def _static_class_roles(model: nn.Module, layers: dict[str, nn.Module], roles: dict[str, LayerRole]) -> None:
    for name, m in model.named_modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            for leaf, role in (("linear1", "mlp_up"), ("linear2", "mlp_down")):
                full = f"{name}.{leaf}" if name else leaf
                if full in layers and full not in roles:
                    roles[full] = LayerRole(role, f"{leaf} of {type(m).__name__} {name or '(root)'} (its feed-forward)")


def infer_roles(model: nn.Module, example: Mapping[str, Any] | None = None) -> tuple[dict[str, LayerRole], list[str]]:
    """Role of every planned layer (name -> LayerRole) and notes on how the inference went.

    `example`: keyword inputs for one probe forward (on the model's device/dtype). Without it, or if
    the forward fails, roles come from the attention sites, tied weights, module classes and names."""
    from quantkit.attention import attention_sites

    notes: list[str] = []
    layers = {name: m for name, m, _ in iter_layers(model)}
    roles: dict[str, LayerRole] = {}
    for name, m in layers.items():
        kind = layer_kind(m)
        if kind == "embedding":
            roles[name] = LayerRole("embedding", f"an embedding table ({type(m).__name__})")
        elif kind == "conv":
            roles[name] = LayerRole("conv", f"a convolution ({type(m).__name__})")
    sites = [s for s in attention_sites(model)]
    site_names = [s.name for s in sites]
    blocks = _blocks(model, site_names)
    probe = None
    if example:
        try:
            probe = _probe(model, example, layers, site_names, blocks, flow=True)
        except Exception as e:  # noqa: BLE001 — a model that cannot run its example still gets name roles
            notes.append(f"roles: the probe forward failed ({type(e).__name__}: {str(e)[:120]}); roles from the "
                         "module tree and names only")
    else:
        notes.append("roles: no example inputs for a probe forward; roles from the module tree and names only")

    # 1. Attention: linears inside an attention site, and the one that reads a site's output.
    for site in sites:
        inside = [n for n in layers if _inside(n, site.name) and n != site.name and n not in roles]
        _attention_roles(site.name, site.module, inside, probe, layers, roles)
    for name in layers:  # attention linears the probe did not see called: by name, inside the site
        site = next((s for s in sites if _inside(name, s.name) and s.name != name), None)
        if site is not None and name not in roles:
            role = _role_from_name(name)
            if role and role.startswith("attention_"):
                roles[name] = LayerRole(role, f"in attention {site.name}; which projection by its name")

    # 2. Heads: a weight tied to an embedding, or the layer whose output is the model's output.
    for name, emb in _tied_to_embedding(model, layers).items():
        roles.setdefault(name, LayerRole("head", f"its weight is the embedding {emb}'s (tied): the output head"))
    if probe is not None and (probe.blocks or sites):
        # A head sits on a trunk of blocks (a bare MLP's last layer is no head), after every block: a
        # projector's output may be returned too (PaliGemma's image_hidden_states).
        last_block_end = max((s.end for s in probe.blocks.values() if s.end >= 0), default=0)
        for name, call in probe.calls.items():
            if (name not in roles and layer_kind(layers[name]) == "linear" and call.order > last_block_end
                    and _is_output(probe, call)):
                roles[name] = LayerRole("head", "its output is the model's output")

    # The linear that reads a site's output (BERT's attention.output.dense) is its output projection,
    # unless it is the model's head (decided above: a site can be a whole block).
    if probe is not None:
        site_outputs = {id(t): s for s, span in probe.sites.items() for t in (r() for r in span.outputs)
                        if t is not None}
        for name, call in probe.calls.items():
            x = call.input()
            if name not in roles and x is not None and id(x) in site_outputs:
                roles[name] = LayerRole("attention_out", f"reads the output of attention {site_outputs[id(x)]}")

    # 3. Conditioning: layers that never see the main input (timestep, class label, state MLPs).
    if probe is not None:
        key = _main_float_input(example)
        if key is not None:
            try:
                independent = _independent_of(model, example, key, layers, probe)
            except Exception as e:  # noqa: BLE001
                independent = set()
                notes.append(f"roles: the conditioning probe failed ({type(e).__name__}: {str(e)[:120]})")
            for name in sorted(independent, key=lambda n: probe.calls[n].order):
                if name not in roles and layer_kind(layers[name]) == "linear":
                    roles[name] = LayerRole("conditioning", f"does not depend on the main input '{key}': it reads "
                                                            "only the other inputs (timestep, label, state)")

    _static_class_roles(model, layers, roles)

    # 4. MLPs: d -> h -> d chains within one block.
    if probe is not None:
        order = sorted(probe.calls, key=lambda n: probe.calls[n].order)

        def block_of(name: str) -> str | None:
            inner = [b for b in blocks if _inside(name, b)]
            return max(inner, key=len) if inner else None

        _mlp_roles(order, layers, probe, roles, block_of)

        # 5. Projectors: outside every block, called after one block and before another.
        spans = sorted((s for s in probe.blocks.values() if s.end >= 0), key=lambda s: s.start)
        for name in order:
            if name in roles or layer_kind(layers[name]) != "linear" or any(_inside(name, b) for b in blocks):
                continue
            at = probe.calls[name].order
            if any(s.end < at for s in spans) and any(s.start > at for s in spans):
                roles[name] = LayerRole("projector", "between two stacks of blocks, in no block: a modality projector")
        # 6. The last linear, after every block, in no block: the output head.
        last_end = max((s.end for s in spans), default=0)
        after = [n for n in order if layer_kind(layers[n]) == "linear" and probe.calls[n].order > last_end
                 and not any(_inside(n, b) for b in blocks)]
        if spans and after and after[-1] not in roles:
            roles[after[-1]] = LayerRole("head", "the last linear layer, after every block")

    # 7. Names, the fallback: the layer's own name, else the MLP container it sits in (up/down by shape).
    for name in layers:
        if name not in roles:
            role = _role_from_name(name)
            if role is not None:
                roles[name] = LayerRole(role, "by its name (the structure did not say)")
    for name, m in layers.items():
        container = _MLP_CONTAINER.search(name.lower())
        if name not in roles and container and layer_kind(m) == "linear":
            fin, fout = _features(m)
            role = "mlp_down" if fin and fout and fout < fin else "mlp_up"
            roles[name] = LayerRole(role, f"inside {name[:container.end(1)]} (an MLP by its name); "
                                          f"{role[4:]} by its shape {fin} -> {fout}")
    for name in layers:
        roles.setdefault(name, LayerRole(None, "not inferred"))
    return roles, notes
