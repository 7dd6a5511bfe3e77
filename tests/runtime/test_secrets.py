"""API keys come from a file or an environment variable a spec names; an unusable file is named."""

import pytest

from raylm.runtime.secrets import ApiKeyError, read_api_key


@pytest.mark.quick
def test_a_key_comes_from_its_file_else_its_variable_and_a_bad_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEY", " from-env \n")
    (tmp_path / "key").write_text("from-file\n")
    assert read_api_key(str(tmp_path / "key"), "TEST_KEY", "http.api_key_file") == "from-file"
    assert read_api_key(None, "TEST_KEY", "http.api_key_file") == "from-env"
    monkeypatch.delenv("TEST_KEY")
    assert read_api_key(None, "TEST_KEY", "http.api_key_file") is None
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ApiKeyError, match=r"^endpoint.api_key_file .*empty is empty$"):
        read_api_key(str(tmp_path / "empty"), "TEST_KEY", "endpoint.api_key_file")
    with pytest.raises(ApiKeyError, match=r"^http.api_key_file .*nowhere: cannot read it"):
        read_api_key(str(tmp_path / "nowhere"), "TEST_KEY", "http.api_key_file")
