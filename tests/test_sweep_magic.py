"""%patch_sweep through an InteractiveShell: the magic is a thin layer over ii.patch_sweep."""

from __future__ import annotations

import pytest
import torch
from IPython.core.error import UsageError

import ipy_intervene as ii
from ipy_intervene.errors import InputError, SiteError
from ipy_intervene.magics.command import SweepCommand
from conftest import CORRUPT, PROMPT, checksum, hook_count

LINE = '%patch_sweep model --clean clean --corrupted corrupt --metric logit_diff("Mary", "John")'


@pytest.fixture
def sweep_shell(shell):
    shell.user_ns.update(clean=PROMPT, corrupt=CORRUPT)
    shell.user_ns.pop("_sweep", None)
    yield shell
    shell.user_ns.pop("_sweep", None)


def test_magic_equals_the_python_api(sweep_shell, demo):
    sweep_shell.run_cell(LINE + " --site mlp_out --positions [-1, 10] --out mlp")
    ns = sweep_shell.user_ns
    assert ns["mlp"] is ns["_sweep"] and isinstance(ns["_sweep"], ii.SweepResult)
    expected = ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"),
                              site="mlp_out", positions=[-1, 10])
    torch.testing.assert_close(ns["mlp"].values, expected.values)
    assert ns["mlp"].site == "mlp_out" and ns["mlp"].positions == [14, 10]


def test_magic_shows_a_heatmap(sweep_shell, capsys):
    shell = sweep_shell
    shown = []
    shell.display_pub.publish = lambda data, **kw: shown.append(data)
    try:
        shell.run_cell(LINE + " --site head_out")
    finally:
        del shell.display_pub.publish
    (bundle,) = shown
    assert "text/html" in bundle and "plotly" in bundle["text/html"].lower()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "SweepResult(activation patching" in bundle["text/plain"]


def test_quiet_shows_nothing_and_methods_pass_through(sweep_shell):
    shown = []
    sweep_shell.display_pub.publish = lambda data, **kw: shown.append(data)
    try:
        sweep_shell.run_cell(LINE + " --method attribution --direction noising --quiet")
        sweep_shell.run_cell('%patch_sweep model --clean clean --method noise '
                             '--subject "Mary and John" --samples 2 --site "mlp_out" '
                             '--window 3 --quiet --out traced')
    finally:
        del sweep_shell.display_pub.publish
    assert shown == []
    assert sweep_shell.user_ns["traced"].method == "noise"
    extra = sweep_shell.user_ns["traced"].extra
    assert extra["window"] == 3 and extra["metric_positions"] == "declared: [14]"


@pytest.mark.parametrize("line,message", [
    ("%patch_sweep", "needs a MODEL"),
    ("%patch_sweep model --corrupted corrupt --metric logit_diff('Mary', 'John')", "--clean"),
    (LINE + " --sight mlp_out", "unknown option --sight"),
    (LINE + " --site", "--site needs a value"),
    (LINE + " --quiet yes", "--quiet takes no value"),
    (LINE + " --out 3x", "not a valid Python name"),
    (LINE + " --layers range(nope)", "--layers `range(nope)` failed: NameError"),
    ("%patch_sweep mdl --clean clean", "MODEL `mdl` failed"),
])
def test_bad_magic_lines_are_usage_errors(sweep_shell, line, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep_shell.run_cell(line)
    assert "_sweep" not in sweep_shell.user_ns


@pytest.mark.parametrize("extra,error,message", [
    (" --site resid_middle", SiteError, "unknown site 'resid_middle'"),
    (" --method exact", InputError, "method='exact' is not one of"),
    (" --layers [4]", SiteError, "layer 4 is out of range: there are 4 layers"),
])
def test_bad_values_name_what_was_expected(sweep_shell, demo, extra, error, message):
    before = checksum(demo.module)
    with pytest.raises(error, match=message):
        sweep_shell.run_cell(LINE + extra)
    assert "_sweep" not in sweep_shell.user_ns
    assert hook_count(demo.module) == 0 and checksum(demo.module) == before


def test_sweep_command_keeps_expressions_whole():
    cmd = SweepCommand.parse('m --clean ["a b", "c d"] --metric f(x, -1) --batch-size 4 --quiet')
    assert cmd.model == "m"
    assert cmd.options == {"clean": '["a b", "c d"]', "metric": "f(x, -1)", "batch_size": "4",
                           "quiet": ""}
    with pytest.raises(UsageError, match="given twice"):
        SweepCommand.parse("m --site a --site b")


def test_method_atp_star_is_the_python_apis_atp_star(sweep_shell, demo):
    import ipy_intervene as ii
    from ipy_intervene.sweep.atp_star import sweep as atp_star

    sweep_shell.run_cell(LINE + " --site head_q --method atp* --quiet --out star")
    got = sweep_shell.user_ns["star"]
    want = atp_star(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), site="head_q")
    assert got.method == "atp*" and got.dims == ("layer", "head")
    assert torch.equal(got.values, want.values) and torch.equal(got.raw, want.raw)


def test_edge_attribution_magic_is_the_python_call(sweep_shell, demo):
    import ipy_intervene as ii

    sweep_shell.run_cell('%edge_attribution model --clean clean --corrupted corrupt '
                         '--metric logit_diff("Mary", "John") --method eap-ig --steps 2 '
                         '--out edges')
    got = sweep_shell.user_ns["edges"]
    assert sweep_shell.user_ns["_edges"] is got
    want = ii.edge_attribution(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"),
                               method="eap-ig", steps=2)
    assert got.method == "eap-ig" and torch.equal(got.scores.nan_to_num(), want.scores.nan_to_num())


@pytest.mark.parametrize("line, message", [
    ("%edge_attribution model --clean clean --metric logit_diff('Mary', 'John')",
     "needs --corrupted"),
    ("%edge_attribution model --clean clean --corrupted corrupt --metric m --stepz 3",
     "did you mean --steps"),
])
def test_edge_attribution_magic_line_errors_are_usage_errors(sweep_shell, line, message):
    with pytest.raises(UsageError, match=message):
        sweep_shell.run_cell(line)


def test_edge_attribution_magic_bad_method_names_the_choices(sweep_shell):
    from ipy_intervene.errors import InputError

    with pytest.raises(InputError, match="eap-ig"):
        sweep_shell.run_cell('%edge_attribution model --clean clean --corrupted corrupt '
                             '--metric logit_diff("Mary", "John") --method eap-xx')


def test_latent_and_estimate_options_on_the_line_equal_the_python_call(sweep_shell, demo):
    ii.attach(demo, demo.transformer.h[2], ii.load_sae("demo"))
    try:
        line = ('model --clean clean --corrupted corrupt --metric logit_diff("Mary", "John") '
                '--site sae --latents [1, 43] --positions [-1] --quiet')
        magic = sweep_shell.run_line_magic("patch_sweep", line)
        python = ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"),
                                site="sae", latents=[1, 43], positions=[-1])
        assert magic.dims == ("latent", "pos") and torch.equal(magic.raw, python.raw)
    finally:
        ii.detach(demo)
    line = ('model --clean clean --corrupted corrupt --metric logit_diff("Mary", "John") '
            '--site head_k --method atp* --grad-drop False --quiet')
    magic = sweep_shell.run_line_magic("patch_sweep", line)
    python = ii.patch_sweep(demo, PROMPT, CORRUPT, ii.logit_diff("Mary", "John"), site="head_k",
                            method="atp*", grad_drop=False)
    assert torch.equal(magic.raw, python.raw)
    edges = sweep_shell.run_line_magic("edge_attribution", 'model --clean clean --corrupted '
                                       'corrupt --metric logit_diff("Mary", "John") '
                                       '--direction noising')
    assert edges.direction == "noising"
    assert hook_count(demo.module) == 0
