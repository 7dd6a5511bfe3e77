"""The DDP reference run that the pretraining and strategy tests compare against (one per session)."""

import pytest

from raylm.spec import validate_dict
from raylm.submit import run_here
from tests.conftest import tiny_spec


@pytest.fixture(scope="session")
def reference_run(ray_local, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference") / "run"
    summary = run_here(validate_dict(tiny_spec(output)))
    return output, summary
