"""Golden outputs: every method's class probabilities on a seeded tiny CLIP stay as recorded.

`tests/golden/make_golden.py` records them (run it only for a change you mean, and say why in the
commit); a refactor that moves any method's numbers fails here.
"""

import json

import pytest
import torch
from golden.make_golden import CASES, GOLDEN_FILE, golden_backbone, run_case

TOL = 2e-5
GOLDEN = json.loads(GOLDEN_FILE.read_text())


@pytest.fixture(scope="module")
def backbone():
    return golden_backbone()


def test_every_case_is_recorded():
    assert sorted(GOLDEN) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_probabilities_match_the_golden_slice(backbone, name):
    expected = torch.tensor(GOLDEN[name]["values"]).reshape(GOLDEN[name]["shape"])
    actual = run_case(backbone, name)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=TOL, rtol=0)
