"""The compression tests start from the session's pretrained tiny Llama: a raylm run, so a job's
held-out text defaults to that run's own validation split."""

import pytest
import yaml
from click.testing import CliRunner

from raylm import cli


@pytest.fixture(scope="session")
def trained(reference_run):
    return reference_run[0] / "model"


def validate_fails(tmp_path, spec: dict) -> str:
    """`raylm validate` on the spec: exit 2 and its message."""
    file = tmp_path / "spec.yaml"
    file.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(cli.main, ["validate", str(file)])
    assert result.exit_code == 2, result.output
    return result.output
