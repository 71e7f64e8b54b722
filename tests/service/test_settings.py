import pytest
from pydantic import ValidationError

from service.settings import DEFAULT_BUNDLE, Settings


def test_defaults_serve_the_shipped_bundle_embedded_on_localhost(monkeypatch):
    for key in ("MAGNET_BUNDLE", "MAGNET_UPSTREAM", "MAGNET_HOST", "MAGNET_PORT"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert (s.bundle, s.upstream, s.host, s.port) == (DEFAULT_BUNDLE, None, "127.0.0.1", 8000)
    assert s.explain is False


def test_environment_twins(monkeypatch):
    monkeypatch.setenv("MAGNET_UPSTREAM", "http://triton:8000")
    monkeypatch.setenv("MAGNET_PORT", "9000")
    monkeypatch.setenv("MAGNET_EXPLAIN", "true")
    s = Settings()
    assert (s.upstream, s.port, s.explain) == ("http://triton:8000", 9000, True)
    assert Settings(port=9100).port == 9100  # explicit values (CLI flags) win over the environment


def test_every_field_is_documented():
    assert all(f.description for f in Settings.model_fields.values())


def test_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv("MAGNET_DEVICE", "tpu")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize("name", ["my session", "a;b", "a=b", '"x"', ""])
def test_a_cookie_name_must_be_a_token(name):
    with pytest.raises(ValidationError, match="cookie name"):
        Settings(session_cookie=name)
    assert Settings(session_cookie="magnet.session-2").session_cookie == "magnet.session-2"


def test_magnet_serve_names_a_bad_flag_or_variable_in_one_line_without_a_traceback(monkeypatch, capsys):
    from service.cli import main

    monkeypatch.delenv("MAGNET_PORT", raising=False)
    assert main(["serve", "--port", "99999"]) == 2
    assert capsys.readouterr().err == "magnet serve: --port 99999: Input should be less than or equal to 65535\n"
    assert main(["serve", "--http_port", "99999"]) == 2  # KServe's argument is named as given
    assert capsys.readouterr().err == "magnet serve: --http_port 99999: Input should be less than or equal to 65535\n"
    monkeypatch.setenv("MAGNET_MODE", "loud")
    monkeypatch.setenv("MAGNET_RATE_LIMIT", "lots")
    assert main(["serve", "--workers", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("magnet serve: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "MAGNET_MODE 'loud': Input should be 'enforce' or 'shadow'" in err
    assert "MAGNET_RATE_LIMIT 'lots': expected '0' (off) or 'N/W'" in err and "--workers -1: " in err
    monkeypatch.delenv("MAGNET_RATE_LIMIT")
    monkeypatch.delenv("MAGNET_MODE")
    monkeypatch.setenv("MAGNET_EXPLAIN", "maybe")
    assert main(["serve"]) == 2 and capsys.readouterr().err.startswith("magnet serve: MAGNET_EXPLAIN 'maybe': ")
    monkeypatch.delenv("MAGNET_EXPLAIN")
    monkeypatch.setenv("MAGNET_SESSION_SECRET_FILE", "/nonexistent/secret")
    assert main(["serve"]) == 2  # a check across settings: its own message
    assert capsys.readouterr().err == "magnet serve: MAGNET_SESSION_SECRET_FILE /nonexistent/secret: No such file or directory\n"
