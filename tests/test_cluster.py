"""``patch_sweep(..., cluster=...)`` on a local Ray: bit-identical to the local sweep, a
dead actor's chunks re-run, Ctrl-C cancels the remote work and leaves every model clean."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ray = pytest.importorskip("ray")

import ipy_intervene as ii  # noqa: E402
from ipy_intervene.errors import InputError  # noqa: E402
from ipy_intervene.sweep import cluster as clusters  # noqa: E402
from ipy_intervene.sweep.cluster import RayCluster  # noqa: E402

from conftest import CORRUPT, PROMPT, hook_count, tiny_model  # noqa: E402

METRIC = ii.logit_diff("Mary", "John")


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    pool = RayCluster(workers=2)
    yield pool
    pool.close()
    if started:
        ray.shutdown()


def same(local: ii.SweepResult, remote: ii.SweepResult) -> None:
    for name in ("values", "raw", "prompt_values"):
        assert torch.equal(getattr(local, name), getattr(remote, name)), name
    assert (local.clean, local.corrupted) == (remote.clean, remote.corrupted)
    assert (local.dims, local.tokens, local.extra) == (remote.dims, remote.tokens, remote.extra)


def test_demo_sites_are_bit_identical_with_one_progress_bar(cluster, demo, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.done, self.disable = total, 0, kwargs["disable"]
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            pass

    monkeypatch.setattr(clusters, "tqdm", Bar)
    sites = "resid_pre,attn_out,mlp_out"  # batch_size=1: where the low bits are most fragile
    local = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, site=sites, batch_size=1)
    remote = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, site=sites, batch_size=1,
                            cluster=cluster)
    for site in local:
        same(local[site], remote[site])
    assert [(b.total, b.done, b.disable) for b in bars] == [(60, 60, True)] * 3
    assert [ray.get(a.hook_count.remote()) for a in cluster.actors()] == [0, 0]  # workers clean
    assert hook_count(demo.module) == 0


def test_noising_head_out_and_causal_tracing(cluster, demo):
    for kwargs in (dict(site="head_out", direction="noising", batch_size=3),
                   dict(site="mlp_out", method="noise", subject="Mary and John", samples=3,
                        window=3, batch_size=5)):
        corrupt = None if kwargs.get("method") == "noise" else CORRUPT
        metric = ii.prob("Mary") if corrupt is None else METRIC
        same(ii.patch_sweep(demo, PROMPT, corrupt, metric, **kwargs),
             ii.patch_sweep(demo, PROMPT, corrupt, metric, cluster=cluster, **kwargs))


@pytest.mark.parametrize("arch, sites", [("gpt2", ("resid_mid", "mlp_out")),
                                         ("llama", ("attn_out",))])
def test_random_models_two_prompts(cluster, demo, arch, sites):
    model = ii.wrap(tiny_model(arch, len(demo.tokenizer)), demo.tokenizer)
    clean = [PROMPT, "When Tom and Anna went to the park , Tom gave a ball to"]
    corrupt = [CORRUPT, "When Tom and Anna went to the park , Anna gave a ball to"]
    metric = ii.logit_diff(["Mary", "Anna"], ["John", "Tom"])
    for site in sites:
        same(ii.patch_sweep(model, clean, corrupt, metric, site=site, batch_size=6),
             ii.patch_sweep(model, clean, corrupt, metric, site=site, batch_size=6,
                            cluster=cluster))


def dies(actor, seconds: float = 60.0) -> bool:
    """True once the actor is dead (a kill reaches it asynchronously: a call made just
    after ``ray.kill`` can still be served)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.hook_count.remote(), timeout=seconds)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.05)
    return False


def test_a_killed_actor_has_its_chunks_rerun(cluster, demo):
    killed = []

    def kill_first(actor):  # after its first chunk; its next chunk is sent to a dead actor
        if not killed:
            killed.append(actor)
            ray.kill(actor)
            assert dies(actor)

    local = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, batch_size=2)
    before = cluster.replaced
    cluster._after_chunk = kill_first
    try:
        remote = ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, batch_size=2, cluster=cluster)
    finally:
        cluster._after_chunk = None
    same(local, remote)
    assert cluster.replaced == before + 1
    assert killed[0] not in cluster.actors() and len(cluster.actors()) == 2


def test_ctrl_c_cancels_the_remote_work_and_leaves_models_clean(cluster, demo):
    weights = copy.deepcopy(demo.module.state_dict())
    ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, batch_size=2, cluster=cluster)  # actors up
    actors = cluster.actors()

    def interrupt(actor):  # a real Ctrl-C, after the first chunk came back
        os.kill(os.getpid(), signal.SIGINT)

    cluster._after_chunk = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, batch_size=2, cluster=cluster)
    finally:
        cluster._after_chunk = None
    assert cluster.actors() == []
    assert all(dies(actor) for actor in actors)  # killed: nothing keeps running there
    assert hook_count(demo.module) == 0
    now = demo.module.state_dict()
    assert all(torch.equal(weights[k], now[k]) for k in weights)
    same(ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, batch_size=7),  # and it starts again
         ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, batch_size=7, cluster=cluster))


def test_an_error_in_a_chunk_is_raised_in_the_driver(cluster, demo):
    def picky(logits):  # fails on the workers only (a nested def travels by value)
        if ray.get_runtime_context().get_actor_id() is not None:
            raise ValueError("picky metric")
        return logits[:, -1, 0]

    with pytest.raises(ValueError, match="picky metric"):
        ii.patch_sweep(demo, PROMPT, CORRUPT, picky, batch_size=8, cluster=cluster)
    assert cluster.actors() == [] and hook_count(demo.module) == 0


def test_clear_errors(cluster, demo):
    with pytest.raises(InputError, match="RayCluster"):
        ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, cluster="local")
    with pytest.raises(InputError, match="'activation' or 'noise'"):
        ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, method="attribution", cluster=cluster)
    with pytest.raises(InputError, match="head_q"):
        ii.patch_sweep(demo, PROMPT, CORRUPT, METRIC, site="resid_pre,head_q", cluster=cluster)
    with pytest.raises(InputError, match="workers=0"):
        RayCluster(workers=0)
    with pytest.raises(InputError, match="gpus_per_worker"):
        RayCluster(gpus_per_worker=-1)
    with pytest.raises(InputError, match="picklable"):
        lock = __import__("threading").Lock()
        ii.patch_sweep(demo, PROMPT, CORRUPT, lambda logits: logits[:, -1, 0] + 0 * bool(lock),
                       cluster=cluster, batch_size=4)


def test_import_does_not_import_ray():
    code = "import sys, ipy_intervene; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
