"""Each PII type is found and redacted; ordinary text is left alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.datasets.records import conversation
from tunefleet.datasets.pii import find, redact
from tunefleet.v1.dataset_pb2 import PiiType

CASES = [
    ("EMAIL", "Send the invoice to maria.garcia+billing@example.co.uk today."),
    ("PHONE", "Call our office on +44 20 7946 0958 before noon."),
    ("PHONE", "Her number is (415) 555-0132."),
    ("CREDIT_CARD", "Charge it to 4539 1488 0343 6467 please."),
    ("CREDIT_CARD", "Card: 5555-5555-5555-4444"),
    ("US_SSN", "My SSN is 123-45-6789 and I need help."),
    ("IBAN", "Wire it to DE89 3704 0044 0532 0130 00 by Friday."),
    ("IBAN", "Account GB82WEST12345698765432."),
    ("IPV4", "The server at 10.0.12.254 is down."),
    ("IPV6", "Connect to 2001:db8:85a3::8a2e:370:7334 instead."),
    ("CLOUD_ACCESS_KEY", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE"),
    ("CLOUD_ACCESS_KEY", "Use key AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe for maps."),
    (
        "PRIVATE_KEY",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
        "-----END OPENSSH PRIVATE KEY-----",
    ),
    ("BEARER_TOKEN", "curl -H 'Authorization: Bearer 9f8e7d6c5b4a39281706a1b2c3d4e5f6'"),
    (
        "BEARER_TOKEN",
        "token eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
        "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ),
    ("BEARER_TOKEN", "export GITHUB_TOKEN=ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
]


@pytest.mark.parametrize(("kind", "text"), CASES)
def test_each_type_is_found_and_redacted(kind: str, text: str) -> None:
    findings = find(text)
    assert [PiiType.Name(f.type) for f in findings] == [f"PII_TYPE_{kind}"]
    redacted = redact(text, findings)
    assert f"<{kind}>" in redacted
    assert text[findings[0].start : findings[0].end] not in redacted


@pytest.mark.parametrize(
    "text",
    [
        "Card 4539 1488 0343 6468 fails the Luhn check.",
        "IBAN DE89 3704 0044 0532 0130 01 fails mod 97.",
        "SSN 000-12-3456 is not valid.",
        "On 2024-01-15 we shipped 1234567890 units, version 1.2.3, at 12:30:45.",
        "Invalid address 300.1.2.3 and ratio 16:9.",
        "Pi is 3.14159265358979 and e is 2.71828182845904.",
    ],
)
def test_lookalikes_are_not_pii(text: str) -> None:
    assert find(text) == []


CODE_AND_MATH = Path(__file__).parent / "corpora" / "code_and_math.txt"

# Personal data planted where code and logs carry it, each with its type.
PLANTED = [
    ("EMAIL", 'AUTHOR_EMAIL = "jane.doe@example.org"  # maintainer'),
    ("EMAIL", "From: Ahmed Khan <a.khan+lists@mail.example.co.uk>"),
    ("PHONE", 'support = {"phone": "+1 (415) 555-0132", "hours": "9-17"}'),
    ("PHONE", "Rufen Sie +49 30 901820 an, bitte."),
    ("PHONE", "Appelez le +33 6 12 34 56 78 demain."),
    ("PHONE", "Tokyo office: +81 3-1234-5678"),
    ("PHONE", "Call 212-555-0199 after 5pm."),
    ("CREDIT_CARD", "2024-01-15 12:30:45 INFO charge card=4111 1111 1111 1111 amount=12.50"),
    ("CREDIT_CARD", "Amex 3782 822463 10005 on file"),
    ("CREDIT_CARD", "mastercard: 2221-0000-0000-0009"),
    ("CREDIT_CARD", "Discover 6011111111111117."),
    ("IBAN", '{"iban": "FR14 2004 1010 0505 0001 3M02 606", "bic": "PSSTFRPP"}'),
    ("IBAN", "Pay to NL91ABNA0417164300 by Monday."),
    ("US_SSN", "ssn = '123-45-6789'"),
    ("IPV4", "2024-01-15T12:30:45Z sshd: Failed password from 203.0.113.42 port 22"),
    ("IPV4", "client 192.168.100.200 connected"),
    ("IPV6", "GET / from 2001:db8:85a3::8a2e:370:7334 took 0.0123s"),
    ("IPV6", "peer fe80::1ff:fe23:4567:890a%eth0 is up"),
]


def test_code_and_math_text_has_no_pii_hits() -> None:
    """Slices, scope operators, long decimals, versions, hashes, timestamps, ids and constants:
    none is personal data, and redaction must leave all of it as it was."""
    lines = [line for line in CODE_AND_MATH.read_text().splitlines() if line.strip()]
    assert len(lines) > 90
    hits = [(line, line[f.start : f.end]) for line in lines for f in find(line)]
    assert hits == []


@pytest.mark.parametrize(("kind", "text"), PLANTED)
def test_planted_pii_is_found_with_its_type(kind: str, text: str) -> None:
    assert [PiiType.Name(f.type) for f in find(text)] == [f"PII_TYPE_{kind}"]


def test_planted_pii_is_found_inside_code_and_math() -> None:
    """Each planted item appended to a line of the corpus: found, typed, and the only finding."""
    lines = [line for line in CODE_AND_MATH.read_text().splitlines() if line.strip()]
    for index, (kind, text) in enumerate(PLANTED * 6):
        line = lines[index % len(lines)]
        findings = find(f"{line} {text}")
        assert [PiiType.Name(f.type) for f in findings] == [f"PII_TYPE_{kind}"], (line, text)


def test_ordinary_records_are_not_flagged() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        question, answer = conversation(rng)
        assert find(question) == [] and find(answer) == []


def test_several_findings_in_one_text() -> None:
    text = "Mail a@b.io, call +1 212 555 0199, card 4111 1111 1111 1111."
    assert redact(text, find(text)) == "Mail <EMAIL>, call <PHONE>, card <CREDIT_CARD>."
