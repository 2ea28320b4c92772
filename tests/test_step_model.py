"""The step cost model (gpurnn.bench.step_model): its fit reproduces every kernel row
measured on a GPU (benchmarks/results.csv, suite "kernel") within the tolerance, every such
row is either described by recorded SASS counts or left out with a stated reason, and the
committed constants are the ones the fit gives."""

import json

import numpy as np
import pytest

from gpurnn.bench import step_model as M


def test_nnls_solves_a_known_problem():
    rng = np.random.default_rng(0)
    A = rng.random((20, 4))
    x_true = np.array([0.5, 0.0, 2.0, 0.1])
    x = M.nnls(A, A @ x_true)
    np.testing.assert_allclose(x, x_true, atol=1e-9)
    # the unconstrained solution has a negative entry: the constrained one is 0 there
    b = A @ np.array([1.0, -1.0, 0.5, 0.0])
    x = M.nnls(A, b)
    assert (x >= 0).all() and x[1] == 0
    assert (
        np.linalg.norm(A @ x - b)
        <= np.linalg.norm(A @ np.clip(np.linalg.lstsq(A, b)[0], 0, None) - b) + 1e-12
    )


def test_every_measured_kernel_row_is_reproduced_or_explained():
    rows = M.measured_rows()
    counts = M.load_counts()
    assert rows, "no kernel rows in benchmarks/results.csv"
    for r in rows:
        described = r["variant"] in counts.get(r["commit"], {})
        assert described or (r["commit"], r["variant"]) in M.EXCLUDED, (
            f"kernel row {r['variant']} of {r['commit']} has no SASS counts in "
            "benchmarks/sass_counts.json: record them (gpurnn.bench.sm90 --record)"
        )
    model = M.fit(rows, counts)
    for card, m in model.items():
        assert m["max_rel_err"] <= M.TOLERANCE, (card, m)
        for r in rows:
            if r["card"] == card and M._fitted(r, counts):
                predicted = M.cost(m["constants"], M._row_features(r, counts))
                assert abs(predicted / r["us"] - 1) <= M.TOLERANCE, (r, predicted)


def test_committed_constants_are_the_fit():
    committed = json.loads(M.MODEL_JSON.read_text())
    fitted = M.fit(M.measured_rows(), M.load_counts())
    assert committed.keys() == fitted.keys()
    for card in fitted:
        for f in M.FEATURES:
            assert committed[card]["constants"][f] == pytest.approx(
                fitted[card]["constants"][f], abs=1e-4
            ), f"refit: python -m gpurnn.bench.step_model --write ({card}, {f})"


def test_polled_prediction_adds_the_retry_path():
    c = dict(trips=1, grid_barrier=0, smem_bytes=4096, num_warps=4, bar=10, mma_depth=4,
             mma_units=48, own_trips=0, spills=0, backward=False, polled=True,
             retry="")  # fmt: skip
    consts = {f: 1.0 for f in M.FEATURES}
    best, one = M.predict(consts, c, 0.0), M.predict(consts, c, 1.0)
    assert one - best == pytest.approx(sum(M.retry_features(c).values()))
    # a retry that re-enters at the loads redoes one round trip only
    assert M.predict(consts, dict(c, retry="loads"), 1.0) - best == pytest.approx(1.0)


def test_warmup_compiles_instead_of_launching(monkeypatch):
    """gpurnn.bench.warmup's compile_only: inside it every Triton launch is a warm-up (a
    compile, no launch), and the launch path is restored after it."""
    from triton.runtime.jit import JITFunction

    from gpurnn.bench import warmup

    calls = []

    def fake_run(self, *args, grid, warmup, **kwargs):
        calls.append(warmup)

    monkeypatch.setattr(JITFunction, "run", fake_run)
    with warmup.compile_only():
        JITFunction.run(object.__new__(JITFunction), 1, grid=(1,), warmup=False)
    JITFunction.run(object.__new__(JITFunction), 1, grid=(1,), warmup=False)
    assert calls == [True, False]
