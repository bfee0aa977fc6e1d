"""Settings: environment over YAML over defaults; bad values name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunefleet.runtime.settings import SettingsError, load_settings


def test_defaults_are_the_embedded_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.server.port == 50051
    assert settings.server.metrics_port == 9090
    assert not settings.server.auth.enabled and not settings.server.tls.enabled
    assert settings.database_url == f"sqlite:///{Path('.tunefleet') / 'tunefleet.db'}"
    assert settings.storage.blob_backend == "local"


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "tunefleet.yaml"
    config.write_text("server:\n  port: 6000\n  metrics_port: 9100\nlogging:\n  json_lines: true\n")
    monkeypatch.setenv("TUNEFLEET_SERVER__PORT", "7000")
    settings = load_settings(config)
    assert settings.server.port == 7000
    assert settings.server.metrics_port == 9100
    assert settings.logging.json_lines is True


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TUNEFLEET_SERVER__PORT": "70000"}, "server.port (TUNEFLEET_SERVER__PORT)"),
        ({"TUNEFLEET_LOGGING__LEVEL": "LOUD"}, "logging.level (TUNEFLEET_LOGGING__LEVEL)"),
        ({"TUNEFLEET_SERVER__PROT": "1"}, "server.prot (TUNEFLEET_SERVER__PROT): Extra inputs"),
        ({"TUNEFLEET_STORAGE__BLOB_BACKEND": "s3"}, "s3.bucket is required"),
        ({"TUNEFLEET_SERVER__AUTH__ENABLED": "true"}, "tokens_file is required"),
        ({"TUNEFLEET_SERVER__TLS__CERT_FILE": "/nope.crt"}, "key_file must be set together"),
        ({"TUNEFLEET_INFERENCE__VLLM__MAX_LORA_RANK": "24"}, "must be one of 1, 8, 16"),
        (
            {"TUNEFLEET_TRAINING__LEADER_ELECTION": "database"},
            "worker_endpoint is required with leader_election",
        ),
        (
            {
                "TUNEFLEET_TRAINING__LEADER_ELECTION": "database",
                "TUNEFLEET_TRAINING__WORKER_ENDPOINT": "ipv4:127.0.0.1:1,127.0.0.1:2",
                "TUNEFLEET_TRAINING__LEADER_RENEW_SECONDS": "6",
            },
            "leader_renew_seconds must be at most half of leader_lease_seconds",
        ),
    ],
)
def test_bad_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings()


def test_lora_ranks_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFLEET_ADAPTERS__VLLM_MAX_LORA_RANK", "128")
    monkeypatch.setenv("TUNEFLEET_INFERENCE__VLLM__MAX_LORA_RANK", "256")
    settings = load_settings()
    assert settings.adapters.vllm_max_lora_rank == 128
    assert settings.inference.vllm.max_lora_rank == 256


def test_missing_certificate_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"cert_file '/nope\.crt' is not a readable file"):
        load_settings(server={"tls": {"cert_file": "/nope.crt", "key_file": str(tmp_path)}})


def test_unknown_yaml_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "tunefleet.yaml"
    config.write_text("storage:\n  databse_url: sqlite://\n")
    with pytest.raises(SettingsError, match=r"storage\.databse_url"):
        load_settings(config)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.7", "tunefleet.example"])
def test_a_server_other_machines_reach_needs_tokens_or_says_it_runs_open(
    tmp_path: Path, host: str
) -> None:
    with pytest.raises(SettingsError, match=rf"host '{host}' is reachable .* auth\.disabled"):
        load_settings(server={"host": host})
    tokens = tmp_path / "tokens.yaml"
    on = load_settings(server={"host": host, "auth": {"enabled": True, "tokens_file": tokens}})
    assert on.server.auth.enabled
    assert not load_settings(server={"host": host, "auth": {"disabled": True}}).server.auth.enabled
    with pytest.raises(SettingsError, match="enabled and disabled cannot both be true"):
        load_settings(server={"auth": {"enabled": True, "tokens_file": tokens, "disabled": True}})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_the_loopback_serves_without_tokens(host: str) -> None:
    assert not load_settings(server={"host": host}).server.auth.enabled


def test_the_evaluation_after_training_names_graders_it_knows_and_gates_on_one() -> None:
    with pytest.raises(SettingsError, match=r"training\.evaluation\.graders\.0 .*'exact_match'"):
        load_settings(training={"evaluation": {"graders": ["exact"]}})
    with pytest.raises(SettingsError, match="gate_metric 'exact_match' is not one of graders"):
        load_settings(training={"evaluation": {"graders": ["rouge_l"]}})
    after = load_settings(
        training={"evaluation": {"graders": ["rouge_l"], "gate_metric": "rouge_l"}}
    ).training.evaluation
    assert not after.enabled and after.graders == ["rouge_l"]
