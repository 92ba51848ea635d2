"""The Dockerfile subset parser: supported instructions, errors that name their line."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mvm.builder import dockerfile as D

GOOD = """\
# a comment
ARG SUITE=bookworm
FROM debian:${SUITE} AS base
ENV APP=/app MODE="dev mode"
WORKDIR $APP
COPY --chown=1000:1000 src/ req.txt ./
RUN apt-get install -y \\
    curl && \\
    echo done
RUN ["python3", "-c", "print(1)"]
USER 1000
ENTRYPOINT ["python3"]
CMD ["main.py"]
"""


def test_supported_subset() -> None:
    df = D.parse(GOOD)
    assert df.base == "debian:bookworm" and df.base_line == 3
    assert df.env == {"APP": "/app", "MODE": "dev mode"}
    assert df.workdir == "/app" and df.user == "1000"
    assert df.default_command == ("python3", "main.py")
    kinds = [s.kind for s in df.steps]
    assert kinds == ["env", "env", "workdir", "copy", "run", "run", "user"]
    copy = df.steps[3]
    assert copy.args == ("src/", "req.txt", "./") and copy.chown == "1000:1000"
    run = df.steps[4]
    assert run.line == 7
    assert run.args[:2] == ("/bin/sh", "-c") and "curl &&" in run.args[2]
    assert ("APP", "/app") in run.env
    assert df.steps[5].args == ("python3", "-c", "print(1)")


def test_legacy_env_and_relative_workdir() -> None:
    df = D.parse("FROM x\nENV A some value\nWORKDIR /a\nWORKDIR b\n")
    assert df.env == {"A": "some value"}
    assert df.workdir == "/a/b"


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("FROM x\nRUN true\nEXPOSE 80\n", 3, "EXPOSE"),
        ("FROM x\n\n# c\nHEALTHCHECK CMD true\n", 4, "HEALTHCHECK"),
        ("FROM x\nRUN a \\\n  b\nVOLUME /v\n", 4, "VOLUME"),
        ("FROM x\nFROM y\n", 2, "multi-stage"),
        ("RUN true\n", 1, "before FROM"),
        ("FROM x\nADD https://example.org/f /f\n", 2, "only local files"),
        ("FROM x\nCOPY --from=builder /a /b\n", 2, "--from"),
        ("FROM x\nCOPY onlyone\n", 2, "source and a destination"),
        ("FROM x\nENV 1BAD=x\n", 2, "invalid name"),
    ],
)
def test_errors_name_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(D.DockerfileError) as info:
        D.parse(text)
    assert f"line {line}" in str(info.value)
    assert words in str(info.value)
    assert info.value.data["line"] == line


def test_no_from() -> None:
    with pytest.raises(D.DockerfileError, match="no FROM"):
        D.parse("# nothing\n")


def test_too_big() -> None:
    with pytest.raises(D.DockerfileError, match="larger than"):
        D.parse("FROM x\n" + "RUN true\n" * (D.MAX_BYTES // 9 + 1))


def test_substitute() -> None:
    v = {"A": "1", "E": ""}
    assert D.substitute("$A-${A}-${B:-two}-${E:-d}-$NOPE.", v) == "1-1-two-d-."


@given(st.text(max_size=400))
def test_parse_never_crashes(text: str) -> None:
    """Any text either parses or raises DockerfileError: no other exception escapes."""
    try:
        df = D.parse(text)
    except D.DockerfileError:
        return
    assert df.base


@given(
    st.lists(
        st.sampled_from(["RUN echo hi", "ENV K=v", "WORKDIR /w", "USER u", "COPY a b"]),
        max_size=20,
    ),
    st.sampled_from(["EXPOSE 1", 'SHELL ["sh"]', "ONBUILD RUN x", "STOPSIGNAL 9"]),
)
def test_unsupported_anywhere_is_named(body: list[str], bad: str) -> None:
    lines = ["FROM debian:bookworm", *body, bad]
    with pytest.raises(D.DockerfileError) as info:
        D.parse("\n".join(lines))
    assert f"line {len(lines)}" in str(info.value)
