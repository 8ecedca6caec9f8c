import numpy as np
import pytest

from breastcnn.nn import SGD, Adam, optimizer_from_state
from breastcnn.nn.schedules import CosineDecay, EarlyStopping, ReduceOnPlateau, StepDecay


def _adam_reference(p, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-7):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps / np.sqrt(1 - b2**t))  # Keras: eps added to sqrt(v), not sqrt(v_hat)
    return p


def test_adam_matches_bias_corrected_formula():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(4, 3))
    grads = [rng.normal(size=(4, 3)) for _ in range(5)]
    params = {"w": p0.copy()}
    opt = Adam(lr=0.01)
    for g in grads:
        opt.step(params, {"w": g})
    np.testing.assert_allclose(params["w"], _adam_reference(p0, grads, lr=0.01), rtol=1e-10)


def test_sgd_momentum_and_nesterov():
    p = {"w": np.array([1.0])}
    opt = SGD(lr=0.1, momentum=0.9)
    opt.step(p, {"w": np.array([1.0])})
    opt.step(p, {"w": np.array([1.0])})
    np.testing.assert_allclose(p["w"], [1.0 - 0.1 - (0.09 + 0.1)])
    q = {"w": np.array([1.0])}
    SGD(lr=0.1, momentum=0.9, nesterov=True).step(q, {"w": np.array([1.0])})
    np.testing.assert_allclose(q["w"], [1.0 + 0.9 * -0.1 - 0.1])


@pytest.mark.parametrize("make", [lambda: Adam(lr=0.02), lambda: SGD(lr=0.1, momentum=0.8, nesterov=True)])
def test_state_dict_resume_takes_identical_step(make):
    rng = np.random.default_rng(1)
    params = {"a": rng.normal(size=5).astype(np.float32), "b": rng.normal(size=(2, 2)).astype(np.float32)}
    opt = make()
    for _ in range(3):
        opt.step(params, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()})
    state = opt.state_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype.kind != "O" for v in state.values())
    resumed = optimizer_from_state({k: v.copy() for k, v in state.items()})
    assert type(resumed) is type(opt) and resumed.iterations == 3 and resumed.lr == opt.lr
    g = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    p1 = {k: v.copy() for k, v in params.items()}
    p2 = {k: v.copy() for k, v in params.items()}
    opt.step(p1, g)
    resumed.step(p2, g)
    for k in params:
        np.testing.assert_array_equal(p1[k], p2[k])


def test_lr_is_mutable_and_used():
    p = {"w": np.array([0.0])}
    opt = SGD(lr=1.0)
    opt.lr = 0.5
    opt.step(p, {"w": np.array([1.0])})
    assert p["w"][0] == -0.5


def test_step_decay_is_global_not_per_epoch():
    sched = StepDecay(0.01, factor=0.5, every=5)
    assert [sched(i) for i in (0, 4, 5, 9, 10, 27)] == [0.01, 0.01, 0.005, 0.005, 0.0025, 0.01 * 0.5**5]


def test_cosine_decay_endpoints():
    sched = CosineDecay(1.0, total_steps=10, min_lr=0.1)
    assert sched(0) == pytest.approx(1.0) and sched(5) == pytest.approx(0.55) and sched(10) == pytest.approx(0.1)
    assert sched(50) == pytest.approx(0.1)


def test_reduce_on_plateau():
    sched = ReduceOnPlateau(1.0, factor=0.5, patience=2, mode="min")
    lrs = [sched.update(v) for v in (1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.5)]
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    again = ReduceOnPlateau(1.0, factor=0.5, patience=2)
    again.load_state_dict(sched.state_dict())
    assert again.update(0.6) == sched.update(0.6)


def test_early_stopping_stops_after_patience():
    es = EarlyStopping(patience=3, mode="max")
    flags = [es.update(v) for v in (0.5, 0.6, 0.6, 0.55, 0.58)]
    assert flags == [True, True, False, False, False] and es.should_stop
    assert es.best == 0.6 and es.best_step == 1
    es2 = EarlyStopping(patience=3, mode="min", min_delta=0.1)
    assert es2.update(1.0) and not es2.update(0.95) and es2.update(0.8)
    assert not es2.should_stop


def test_step_decay_and_early_stopping_on_an_epoch_clock():
    sched = StepDecay(1.0, factor=0.5, every=0.75)  # epochs: 0.75 / 0.25 must count as exactly 3 steps of 0.25
    assert [sched(t) for t in (0.5, 0.75, 1.4, 1.5, 2.25)] == [1.0, 0.5, 0.5, 0.25, 0.125]
    es = EarlyStopping(patience=1.5, mode="max", min_at=2.0)
    for at, value in ((0.5, 0.4), (1.0, 0.5), (1.5, 0.5), (2.0, 0.45), (2.5, 0.45)):
        es.update(value, at=at)
    assert es.should_stop and es.best == 0.5 and es.best_at == 1.0  # 2.5 - 1.0 >= 1.5, and 2.5 > 2.0
    again = EarlyStopping(patience=1.5, mode="max", min_at=2.0)
    again.load_state_dict(es.state_dict())
    assert again.update(0.6, at=3.0) and not again.should_stop  # an improvement clears the stop
    legacy = {"best": 0.5, "best_step": 1, "step": 4, "wait": 3, "should_stop": True}  # a pre-clock checkpoint
    old = EarlyStopping(patience=3)
    old.load_state_dict(legacy)
    assert old.best_at == 1 and not old.update(0.4) and old.should_stop
