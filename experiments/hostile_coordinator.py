"""A hostile coordinator: crafted messages and run configs sent to the real ClientApp
of one deployed site, in this process (`experiments.attack_site`, and the site-rule,
site-limits and secrecy tests through `tests/hostile.py`)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from unittest import mock

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import runtime
from clients.client_app import app as client_app
from fed_dplora.config import parse_run_config
from fed_dplora.data.demo import LABELS
from fed_dplora.lora.adapters import trainable_arrays
from fed_dplora.lora.model import ModelRecipe
from fed_dplora.site.trainer import LocalTrainer
from strategies import wire as p
from strategies.round_config import client_config
from strategies.wire import to_record

NODE = 100
FEDERATION_LABELS = tuple(sorted(LABELS))  # the order the census would fix
# What makes this process a deployed site's ClientApp task: not a simulation, one task.
AS_DEPLOYED = ((runtime, "in_simulation", lambda: False), (TaskIdentity, "_run_id", 1),
               (TaskIdentity, "_task_id", 1), (TaskIdentity, "_node_id", NODE))


@contextlib.contextmanager
def as_deployed() -> Iterator[None]:
    """This process as a deployed site's task while the block runs."""
    with contextlib.ExitStack() as patches:
        for owner, name, value in AS_DEPLOYED:
            patches.enter_context(mock.patch.object(owner, name, value))
        yield


class HostileCoordinator:
    """Sends crafted messages to one deployed site's real ClientApp, in process (inside
    `as_deployed()`)."""

    def __init__(self, node_config: dict, run_config: dict, run_id: int = 1) -> None:
        self.context = Context(run_id=run_id, node_id=NODE, node_config=node_config,
                               state=RecordDict(), run_config=run_config)

    def send(self, kind: str, content: RecordDict) -> Message:
        """The reply, or the error reply Flower sends when the ClientApp raises."""
        message = Message(content, dst_node_id=NODE, message_type=kind)
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        try:
            return client_app(message, self.context)
        except Exception as exc:
            return Message(Error(code=0, reason=repr(exc)), reply_to=message)

    def census(self) -> Message:
        return self.send("query", RecordDict({p.CONFIG: client_config(FEDERATION_LABELS)}))

    def train(self, arrays: dict[str, np.ndarray], sigma: float | None = 1.0,
              secure_noise: bool = True) -> Message:
        config = client_config(FEDERATION_LABELS, noise_multiplier=sigma,
                               secure_noise=secure_noise)
        return self.send("train", RecordDict({p.ARRAYS: to_record(arrays), p.CONFIG: config}))

    def evaluate(self, arrays: dict[str, np.ndarray]) -> Message:
        return self.send("evaluate", RecordDict({p.ARRAYS: to_record(arrays),
                                                 p.CONFIG: client_config(FEDERATION_LABELS)}))

    def global_arrays(self) -> dict[str, np.ndarray]:
        """The run's global tensors at their init, as the server would send them."""
        spec = parse_run_config(self.context.run_config)
        trainer = LocalTrainer(ModelRecipe.from_spec(spec, len(FEDERATION_LABELS)),
                               torch.device("cpu"), private=True)
        return {n: a for n, a in trainable_arrays(trainer.model).items()
                if n in trainer.global_names}


def head_bias(arrays: dict[str, np.ndarray]) -> str:
    """The name of the classifier head's bias among `arrays`."""
    names = [n for n, a in arrays.items() if n.endswith("bias") and "lora" not in n
             and a.shape == (len(FEDERATION_LABELS),)]
    if len(names) != 1:
        raise ValueError(f"expected one head bias of {len(FEDERATION_LABELS)} values, "
                         f"found {names}")
    return names[0]
