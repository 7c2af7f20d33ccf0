"""An SAE architecture registered outside the package, as a user's module would: importing this
module registers it (`saejax train --import_modules=tests.registered_architecture`)."""

import dataclasses
from typing import ClassVar

import jax

from saejax import sae


@sae.register
@dataclasses.dataclass(frozen=True)
class ShiftedReluArchitecture(sae.Architecture):
    """`z = relu(pre - 0.1)`: a fixed threshold, which no built-in architecture has."""

    name: ClassVar[str] = "shifted_relu_from_a_test"

    def encode_train(self, ae, params, x_ND, k):
        pre = ae.pre_activations(params, x_ND)
        return sae.Encoding(pre, z=jax.nn.relu(pre - 0.1))
