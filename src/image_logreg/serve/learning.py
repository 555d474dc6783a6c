"""A served model that learns from corrections (``serve --learn``).

Each correction takes a few exact gradient steps (``train.gradient_steps``) on the corrected
image, weighted up, together with a fixed replay sample of the run's training images, so the
model takes in the new image without forgetting the old ones. The steps stop as soon as the
model answers the image as corrected, and the weights never end more than ``MAX_CHANGE`` from
where the correction found them: a wrong label moves the model a bounded step. A change that
would turn more than ``MAX_REPLAY_LOSS`` of the replayed images from right to wrong is shortened.

Every ``CHECK_EVERY`` corrections the new weights are scored on the run's test split; if they
lost more than ``max_drop`` points against the original, the model goes back to the last
weights that passed (the original at first), and the correction's answer says so.

The live model is never changed in place: each correction builds a new model and replaces one
reference, so inference on other threads always sees one whole version. Versions are numbered
"1" (the checkpoint) up, never reused; ``/versions/V/`` answers for the live one and "1".
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import torch

from ..console import quiet, say
from ..train import clip_change, distance_from, gradient_steps
from ..model import LogisticRegression
from .registry import VERSION, ServedModel

# Tuned on MNIST (the default run; 150 misread test digits, each corrected from the original
# model; benchmarks/learn_page.py, two default runs): 83-87% of the answers flip, test accuracy
# moves 0.1 points on average and under 0.9 at most (2.6 without the replay guard); 50 wrong
# labels in a row cost about 1.8 points, and the check rolls them back. Larger weights or steps
# flip more answers and cost more accuracy: weight 200 with 10 fixed steps flips all of them at
# 0.5 points each.
REPLAY_SIZE = 1000
WEIGHT = 50.0  # the corrected image's weight against each replayed image's 1
LR = 0.2
MAX_STEPS = 10
MAX_CHANGE = 0.5  # L2 norm over weight and bias of one correction's change
MAX_REPLAY_LOSS = 0.005  # share of the replayed images one correction may turn from right to wrong
CHECK_EVERY = 50
MAX_DROP = 1.0  # test accuracy points below the original that trigger a rollback


@dataclass(frozen=True)
class Update:
    """What one correction did. ``version``: the live version after it; ``steps``: gradient steps
    taken (0: the model already answered so); ``change``: how far the weights moved (L2);
    ``rolled_back``: set when the check after it sent the model back (from, to, accuracies)."""

    version: str
    steps: int
    change: float
    answered: bool  # the model now answers the image as corrected
    rolled_back: dict | None = None


class OnlineLearner:
    def __init__(self, served: ServedModel, replay: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], *, max_drop: float = MAX_DROP,
                 check_every: int = CHECK_EVERY, log=None):
        """``replay`` and ``test``: (uint8 or float images in the dataset's form, labels)."""
        self.original = served
        self.max_drop = max_drop
        self.check_every = check_every
        self.log = log if log is not None else say
        device = served.model.device
        replay_x, replay_y = served.inputs(replay[0]), replay[1].to(device)
        features = replay_x[0].numel()
        # row 0 is the corrected image's, the rest the replay's: one buffer, filled once
        self._x = torch.empty(len(replay_x) + 1, features, device=device)
        self._x[1:] = replay_x.reshape(len(replay_x), -1)
        self._y = torch.cat([torch.zeros(1, dtype=torch.long, device=device), replay_y.long()])
        self._weight = torch.ones(len(self._y), device=device)
        self._weight[0] = WEIGHT
        self._test_x = served.inputs(test[0]).reshape(len(test[0]), -1)
        self._test_y = test[1].to(device)
        self.baseline = self.accuracy(served.model)
        self._live = served
        self._good = served  # the weights that passed the last check
        self._since_check = 0
        self._last_version = int(VERSION)
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, served: ServedModel, *, data_dir=None, max_drop: float = MAX_DROP,
                 replay_size: int = REPLAY_SIZE, seed: int = 0, log=None) -> "OnlineLearner":
        """The learner for a served run: its replay sample from the run's training split, its
        check on the run's test split (``run.read_eval_data``; nothing is downloaded)."""
        from ..run import read_eval_data

        # the server says once where the data came from
        train = read_eval_data(served.meta, "train", served.path, data_dir, download=False, log=quiet)
        test = read_eval_data(served.meta, "test", served.path, data_dir, download=False, log=quiet)
        picked = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(seed))[:replay_size]
        return cls(served, (train.images[picked], train.labels[picked]), (test.images, test.labels),
                   max_drop=max_drop, log=log)

    @property
    def live(self) -> ServedModel:
        return self._live

    def served(self, version: str | None) -> ServedModel | None:
        """The live model (``version`` None or empty, or its number), the original ("1"), else None."""
        live = self._live
        if not version or version == live.version:
            return live
        return self.original if version == self.original.version else None

    def versions(self) -> list[str]:
        live = self._live.version
        return [self.original.version] + ([live] if live != self.original.version else [])

    @property
    def replay_size(self) -> int:
        return len(self._y) - 1

    @torch.no_grad()
    def accuracy(self, model: LogisticRegression) -> float:
        return model.score(self._test_x, self._test_y)

    def learn(self, image: torch.Tensor, label: int) -> Update:
        """Learn that ``image`` (one image in the dataset's form, uint8 or float 0-1) is class ``label``."""
        with self._lock:  # corrections build on each other: one at a time
            return self._learn(image, label)

    @torch.no_grad()
    def _learn(self, image: torch.Tensor, label: int) -> Update:
        current = self._live
        x = current.inputs(image.reshape(1, *current.input_shape)).reshape(1, -1)
        model = _copy(current.model)
        self._x[0] = x[0]
        self._y[0] = label
        weight, bias = model.linear.weight, model.linear.bias
        start = [weight.clone(), bias.clone()]
        steps, change = 0, 0.0
        # Stepping on past the answer's flip would only fit this one image harder; past
        # MAX_CHANGE the clip takes the weights back anyway.
        while steps < MAX_STEPS and change < MAX_CHANGE and int(model.predict(x)[0]) != label:
            gradient_steps(model, self._x, self._y, steps=1, lr=LR, sample_weight=self._weight)
            steps += 1
            change = distance_from(weight, bias, start)
        if steps == 0:
            return Update(current.version, 0, 0.0, True)
        clip_change(weight, bias, start, MAX_CHANGE)
        change = min(change, MAX_CHANGE)
        change = self._keep_replay(model, current.model, start, change)
        answered = int(model.predict(x)[0]) == label
        self._last_version += 1
        candidate = replace(current, model=model, version=str(self._last_version))
        self._since_check += 1
        rolled_back = None
        if self._since_check >= self.check_every:
            rolled_back = self._check(candidate)
        if rolled_back is None:
            self._live = candidate
            return Update(candidate.version, steps, change, answered)
        self._live = self._good
        answered = int(self._good.model.predict(x)[0]) == label
        return Update(self._good.version, steps, change, answered, rolled_back)

    def _keep_replay(self, model: LogisticRegression, before: LogisticRegression, start: list[torch.Tensor],
                     change: float) -> float:
        """Halve the change until the replayed images lose at most MAX_REPLAY_LOSS of their accuracy
        (four times at most); the change it ends with. A change of bounded size can still point
        along ink that most digits share, and move many answers at once."""
        x, y = self._x[1:], self._y[1:]
        floor = before.score(x, y) - MAX_REPLAY_LOSS
        for _ in range(4):
            if model.score(x, y) >= floor:
                break
            clip_change(model.linear.weight, model.linear.bias, start, change / 2)
            change /= 2
        return change

    def _check(self, candidate: ServedModel) -> dict | None:
        """None if ``candidate`` keeps the test accuracy within ``max_drop`` points of the
        original's (it becomes the weights to go back to); else what the rollback is."""
        self._since_check = 0
        accuracy = self.accuracy(candidate.model)
        drop = 100 * (self.baseline - accuracy)
        if drop <= self.max_drop:
            self._good = candidate
            return None
        target = self._good
        self.log(f"model {candidate.name}: test accuracy {accuracy:.4f} after {self.check_every} corrections, "
                 f"{drop:.2f} points below version {self.original.version}'s {self.baseline:.4f} (--max-drop "
                 f"{self.max_drop:g}): rolled back from version {candidate.version} to version {target.version}")
        return {"from": candidate.version, "to": target.version, "accuracy": accuracy, "baseline": self.baseline,
                "max_drop": self.max_drop}


@torch.no_grad()
def _copy(model: LogisticRegression) -> LogisticRegression:
    """A new model with ``model``'s weights and its checkpoint's temperature and novelty score."""
    copy = LogisticRegression(model.input_shape, model.num_classes).to(model.device)
    copy.linear.weight.copy_(model.linear.weight)
    copy.linear.bias.copy_(model.linear.bias)
    copy.temperature = model.temperature
    copy.novelty = model.novelty
    return copy.eval()
