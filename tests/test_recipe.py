"""Recipe schema, matching semantics, extends, and the errors users see."""

import textwrap

import pytest

from quantkit.errors import RecipeError
from quantkit.recipe import (FORMATS, NamePattern, Precision, load_recipe, parse_precision, recipe_from_dict,
                             shipped_recipe_names)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_recipes_load_and_have_header_comments():
    names = shipped_recipe_names()
    assert {"balanced", "fp8", "nvfp4", "int8-smoothquant", "fp16"} <= set(names)
    for n in names:
        r = load_recipe(n)
        assert r.name == n
        assert r.targets, f"{n} names no target"
        text = open(r.source).read()
        assert text.startswith("# "), f"{n}.yaml lacks its header comment"


def test_precision_aliases_and_formats_defined_once():
    assert parse_precision("fp4") is Precision.NVFP4
    assert parse_precision("FP8") is Precision.FP8
    assert FORMATS[Precision.NVFP4].block_size == 16
    assert FORMATS[Precision.NVFP4].num_bits == (2, 1)
    assert FORMATS[Precision.FP8].num_bits == (4, 3)
    assert FORMATS[Precision.INT8].weight_axis == 0
    assert FORMATS[Precision.NVFP4].bytes_per_weight == pytest.approx(0.5625)
    with pytest.raises(ValueError, match="'fp6' is not one of nvfp4, fp8, int8, fp16, bf16, fp32, skip"):
        parse_precision("fp6")


@pytest.mark.parametrize("pattern,name,expected", [
    ("layers.1", "layers.1", True),
    ("layers.1", "layers.1.mlp.up_proj", True),      # a pattern covers the module's subtree
    ("layers.1", "layers.10.mlp.up_proj", False),    # ... but never a sibling whose name starts alike
    ("layers.1.*", "layers.10.mlp", False),
    ("*.mlp", "model.layers.3.mlp.down_proj", True),
    ("*mlp*", "model.layers.3.mlp.down_proj", True),
    ("*.mlp", "model.layers.3.mlp_gate", False),
    ("*.layers.?.mlp", "model.layers.3.mlp.up", True),
    ("*.layers.?.mlp", "model.layers.13.mlp.up", False),
    ("re:layers\\.1", "layers.10.mlp", False),      # regex is a full match, not a search
    ("re:layers\\.1", "layers.1.mlp", True),
    ("re:.*\\.(q|k|v)_proj", "model.layers.0.self_attn.k_proj", True),
    ("re:.*\\.(q|k|v)_proj", "model.layers.0.self_attn.o_proj", False),
])
def test_name_patterns(pattern, name, expected):
    assert NamePattern(pattern).matches(name) is expected


def test_rule_validation_messages_name_the_rule_and_field(tmp_path):
    p = write(tmp_path, "bad.yaml", """\
        name: bad
        rules:
          - match: "*mlp*"
            precision: fp8
          - match: "*attn*"
            precision: fp6
        """)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and "rules[1].precision" in msg and "'fp6' is not one of" in msg


@pytest.mark.parametrize("body,expected", [
    ("name: x\nrules: [{match: '*', precision: fp8, colour: red}]\n", "rules[0].colour: unknown key"),
    ("name: x\nrulez: []\n", "rulez: unknown key"),
    ("name: x\nrules: [{match: 're:(', precision: fp8}]\n", "rules[0].match: bad regex '('"),
    ("name: x\nrules: [{precision: fp16, calibrator: max}]\n", "nothing to calibrate"),
    ("name: x\ntargets: [mars]\n", "'mars' is not a known target"),
    ("name: x\nattention: {precision: nvfp4}\n", "not supported for attention matmuls"),
    ("name: x\nrules: [{match: '*'}]\n", "rules[0].precision: required field is missing"),
    ("name: x\nrules: {a: 1}\n", "rules: must be a list"),
    ("name: x\nbuild: {profiles: {input_ids: {min: [1, 8], opt: [4, 4], max: [8, 128]}}}\n", "min <= opt <= max"),
])
def test_bad_recipes(tmp_path, body, expected):
    p = write(tmp_path, "r.yaml", body)
    with pytest.raises(RecipeError, match=None) as e:
        load_recipe(p)
    assert expected in str(e.value), str(e.value)
    assert str(p) in str(e.value)


def test_malformed_yaml_names_line(tmp_path):
    p = write(tmp_path, "m.yaml", "name: x\nrules:\n  - match: [unclosed\n")
    with pytest.raises(RecipeError, match=r"m\.yaml:\d+:\d+: malformed YAML"):
        load_recipe(p)


def test_unknown_recipe_lists_shipped():
    with pytest.raises(RecipeError, match="shipped recipes are: .*balanced"):
        load_recipe("balanced-ish")


def test_extends_appends_rules_and_merges_sections(tmp_path):
    write(tmp_path, "base.yaml", """\
        name: base
        targets: [hopper]
        rules:
          - {types: [Linear], precision: fp8}
        protect: {softmax: true, rope: true}
        calibration: {algorithm: max, batch_size: 4}
        """)
    child = write(tmp_path, "child.yaml", """\
        name: child
        extends: base.yaml
        rules:
          - {match: "*mlp*", types: [Linear], precision: int8}
        protect: {rope: false}
        calibration: {batch_size: 2}
        """)
    r = load_recipe(child)
    assert [x.precision for x in r.rules] == [Precision.FP8, Precision.INT8]  # parent first, child after (wins)
    assert r.targets == ["hopper"]
    assert r.protect.softmax is True and r.protect.rope is False
    assert r.calibration.algorithm == "max" and r.calibration.batch_size == 2


def test_extends_replace_rules_and_shipped_parent(tmp_path):
    child = write(tmp_path, "c.yaml", "name: c\nextends: balanced\nreplace_rules: true\nrules: [{types: [Linear], precision: fp8}]\n")
    r = load_recipe(child)
    assert len(r.rules) == 1 and r.attention.precision == Precision.FP8  # attention inherited from balanced


def test_extends_cycle_and_missing_parent(tmp_path):
    write(tmp_path, "a.yaml", "name: a\nextends: b.yaml\n")
    write(tmp_path, "b.yaml", "name: b\nextends: a.yaml\n")
    with pytest.raises(RecipeError, match="extends cycle: a.yaml -> b.yaml -> a.yaml"):
        load_recipe(tmp_path / "a.yaml")
    write(tmp_path, "orphan.yaml", "name: o\nextends: nowhere\n")
    with pytest.raises(RecipeError, match="extends: 'nowhere' is neither a file"):
        load_recipe(tmp_path / "orphan.yaml")


def test_error_in_parent_is_reported_against_parent(tmp_path):
    parent = write(tmp_path, "p.yaml", "name: p\nrules: [{types: [Linear], precision: fp7}]\n")
    write(tmp_path, "k.yaml", "name: k\nextends: p.yaml\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "k.yaml")
    assert str(parent) in str(e.value) and "rules[0].precision" in str(e.value)


def test_native_target_warnings():
    r = recipe_from_dict({"name": "x", "targets": ["orin", "hopper"], "rules": [{"precision": "nvfp4"}],
                          "attention": {"precision": "fp8"}})
    w = "\n".join(r.native_warnings())
    assert "nvfp4 does not run natively on orin" in w
    assert "nvfp4 does not run natively on hopper" in w
    assert "attention: fp8 does not run natively on orin" in w
    assert "fp8 does not run natively on hopper" not in w


def test_weights_activations_overrides():
    r = recipe_from_dict({"name": "w4a8", "rules": [{"precision": "nvfp4", "activations": "fp8"}]})
    assert r.rules[0].weight_precision == Precision.NVFP4 and r.rules[0].activation_precision == Precision.FP8
    with pytest.raises(RecipeError, match="overrides need a quantized precision"):
        recipe_from_dict({"name": "x", "rules": [{"precision": "fp16", "activations": "fp8"}]})


def test_default_thresholds():
    assert load_recipe("fp16").default_cosine_min() == 0.999
    assert load_recipe("fp8").default_cosine_min() == 0.99
    assert load_recipe("balanced").default_cosine_min() == 0.95
    assert load_recipe("nvfp4").default_cosine_min() == 0.97  # set in the recipe


def test_resolved_yaml_round_trips(tmp_path):
    r = load_recipe("balanced")
    p = tmp_path / "resolved.yaml"
    p.write_text(r.to_yaml())
    again = load_recipe(p)
    assert again.sha256() == r.sha256()
    assert again.rules == r.rules
