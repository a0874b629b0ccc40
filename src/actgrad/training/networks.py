"""The lecture's four networks as variant specs, from the models' defaults: the benchmark times them and the
engine's tests train them.

* ``shallow`` — part 1's MLP with the fixed init (``fix_tanh``: W1 x 0.2, b1 x 0.01, W2 x 0.01, b2 = 0);
* ``shallow+BN`` — the same with Kaiming W1, no b1 and the hand-written BatchNorm (``batchnorm``);
* ``deep`` and ``deep+BN`` — part 2's five tanh layers of 100 at gain 5/3, without and with BatchNorm.
"""

from __future__ import annotations

from actgrad.study.settings import MODEL_DEFAULTS, merge

FIXED_INIT = {"C": 1, "W1": 0.2, "b1": 0.01, "W2": 0.01, "b2": 0}


def _spec(model: str, **changes) -> dict:
    return merge(MODEL_DEFAULTS[model], {"model": model, **changes})


LECTURE_NETWORKS = {
    "shallow": _spec("mlp", init=FIXED_INIT),
    "shallow+BN": _spec("mlp", batchnorm=True, hidden_bias="not_drawn", init=dict(FIXED_INIT, W1="kaiming")),
    "deep": _spec("deep", batchnorm=False),
    "deep+BN": _spec("deep", batchnorm=True),
}
