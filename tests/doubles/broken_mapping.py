"""A TEST DOUBLE of a broken weight mapping on the CPU stand-in engines, installed at start in every
process of a run whose spec's `env` sets one of the variables below (sitecustomize.py here; tests/
test_learning.py); what the trainer ranks send is untouched.
ROLLFLEET_TEST_SWAP=a,b loads pushed tensors a and b under each other's names (a wrong name map);
ROLLFLEET_TEST_SHIFT=name loads that tensor's rows one place off (a vocabulary off-by-one)."""

import os


def install() -> None:
    import torch

    from rollfleet.runtime import standin

    original = standin.StandinCore.load_weights
    swap = [n for n in os.environ.get("ROLLFLEET_TEST_SWAP", "").split(",") if n]
    names = dict(zip(swap, reversed(swap))) if len(swap) == 2 else {}
    shift = os.environ.get("ROLLFLEET_TEST_SHIFT")

    def broken(self, weights):
        out = []
        for n, t in weights:
            if n == shift:
                t = torch.roll(t, 1, dims=0)
            out.append((names.get(n, n), t))
        return original(self, out)

    standin.StandinCore.load_weights = broken
