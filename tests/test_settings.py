from pathlib import Path

import pytest

from odyssey_batch.settings import load_settings


def test_defaults_mean_embedded_warehouse(tmp_path):
    s = load_settings({"HOME": str(tmp_path), "ODYSSEY_HOME": str(tmp_path / "h")})
    assert s.embedded and s.database_url == ""
    assert s.home == tmp_path / "h"
    assert s.object_store_location == str(tmp_path / "h" / "objects")
    assert s.default_timezone == "UTC"


def test_toml_file_then_environment_override(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    (home / "odyssey.toml").write_text(
        'database_url = "postgresql://db.example/odyssey"\ns3_secure = false\ningest_workers = 3\n'
        'object_store = "s3://artifacts/odyssey"\n'
    )
    s = load_settings({"ODYSSEY_HOME": str(home), "ODYSSEY_INGEST_WORKERS": "5"})
    assert s.database_url == "postgresql://db.example/odyssey" and not s.embedded
    assert s.s3_secure is False
    assert s.ingest_workers == 5  # the environment wins over the file
    assert s.object_store_location == "s3://artifacts/odyssey"


def test_explicit_config_file_and_unknown_keys(tmp_path):
    config = tmp_path / "conf.toml"
    config.write_text('databse_url = "typo"\n')
    with pytest.raises(ValueError, match=r"unknown setting.*databse_url"):
        load_settings({"ODYSSEY_HOME": str(tmp_path), "ODYSSEY_CONFIG": str(config)})
    with pytest.raises(FileNotFoundError):
        load_settings({"ODYSSEY_HOME": str(tmp_path), "ODYSSEY_CONFIG": str(tmp_path / "missing.toml")})


def test_home_expands_user(monkeypatch):
    s = load_settings({"ODYSSEY_HOME": "~/somewhere"})
    assert s.home == Path("~/somewhere").expanduser()
