"""Detection and redaction of personal data and secrets in text.

Each detector is a regular expression, with a check where the pattern alone would flag ordinary
numbers: card numbers must pass the Luhn check, IBANs the ISO 13616 mod-97 check, IP addresses
must parse, phone numbers need 10 to 15 digits written like a phone number. Detectors whose
pattern needs a particular character are skipped cheaply when the text lacks it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from tunefleet.v1.dataset_pb2 import PiiType


@dataclass(frozen=True)
class Finding:
    type: PiiType.ValueType
    start: int
    end: int


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card(match: str) -> bool:
    digits = re.sub(r"[ -]", "", match)
    return 13 <= len(digits) <= 19 and _luhn(digits) and len(set(digits)) > 1


def _iban(match: str) -> bool:
    compact = match.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in rearranged)
    return int(number) % 97 == 1


def _ssn(match: str) -> bool:
    area, group, serial = match.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _phone(match: str) -> bool:
    digits = sum(char.isdigit() for char in match)
    if not 10 <= digits <= 15:
        return False
    # Written like a phone number: an international prefix, an area code in brackets, or at least
    # two separators between digit groups (so "2024-01-15" or "1234567890" alone do not count).
    separators = len(re.findall(r"\d[ .\-]\(?\d", match))
    return match.startswith("+") or "(" in match or separators >= 2


def _ipv4(match: str) -> bool:
    try:
        ipaddress.IPv4Address(match)
    except ValueError:
        return False
    return True


def _ipv6(match: str) -> bool:
    try:
        ipaddress.IPv6Address(match)
    except ValueError:
        return False
    return match.count(":") >= 2


@dataclass(frozen=True)
class Detector:
    type: PiiType.ValueType
    pattern: re.Pattern[str]
    needs: str  # a substring the text must contain for the pattern to have a chance; "" = digits
    check: Callable[[str], bool] | None = None


DETECTORS: tuple[Detector, ...] = (
    Detector(
        PiiType.PII_TYPE_PRIVATE_KEY,
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
            r".*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)",
            re.DOTALL,
        ),
        "PRIVATE KEY",
    ),
    Detector(
        PiiType.PII_TYPE_BEARER_TOKEN,
        re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
        "eyJ",
    ),
    Detector(
        PiiType.PII_TYPE_BEARER_TOKEN,
        re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]{16,}=*"),
        "earer",
    ),
    Detector(
        PiiType.PII_TYPE_BEARER_TOKEN,
        re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|xox[baprs]-[A-Za-z0-9-]{10,})\b"),
        "_",
    ),
    Detector(
        PiiType.PII_TYPE_CLOUD_ACCESS_KEY,
        re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"),
        "A",
    ),
    Detector(PiiType.PII_TYPE_CLOUD_ACCESS_KEY, re.compile(r"\bAIza[0-9A-Za-z_\-]{35}"), "AIza"),
    Detector(
        PiiType.PII_TYPE_EMAIL,
        re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"),
        "@",
    ),
    Detector(
        PiiType.PII_TYPE_IBAN,
        re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
        "",
        _iban,
    ),
    Detector(
        PiiType.PII_TYPE_CREDIT_CARD,
        re.compile(r"(?<![\d\-])\d(?:[ \-]?\d){12,18}(?![\d\-])"),
        "",
        _card,
    ),
    Detector(
        PiiType.PII_TYPE_US_SSN, re.compile(r"(?<![\d\-])\d{3}-\d{2}-\d{4}(?![\d\-])"), "", _ssn
    ),
    Detector(
        PiiType.PII_TYPE_PHONE,
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?"
            r"\d{2,4}(?:[ .\-]?\d{2,4}){1,4}(?!\w)"
        ),
        "",
        _phone,
    ),
    Detector(
        PiiType.PII_TYPE_IPV6,
        re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])"),
        ":",
        _ipv6,
    ),
    Detector(
        PiiType.PII_TYPE_IPV4, re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])"), ".", _ipv4
    ),
)

_DIGITS = re.compile(r"\d")


def find(text: str) -> list[Finding]:
    """Every finding in `text`, earliest first; a span claimed by an earlier detector (in the
    order above) is not reported again by a later one."""
    findings: list[Finding] = []
    has_digits: bool | None = None
    for detector in DETECTORS:
        if detector.needs:
            if detector.needs not in text:
                continue
        else:
            if has_digits is None:
                has_digits = _DIGITS.search(text) is not None
            if not has_digits:
                continue
        for match in detector.pattern.finditer(text):
            if detector.check is not None and not detector.check(match.group()):
                continue
            start, end = match.span()
            if any(f.start < end and start < f.end for f in findings):
                continue
            findings.append(Finding(detector.type, start, end))
    findings.sort(key=lambda f: f.start)
    return findings


def placeholder(kind: PiiType.ValueType) -> str:
    """The typed placeholder a finding is redacted to, for example `<EMAIL>`."""
    return "<" + PiiType.Name(kind).removeprefix("PII_TYPE_") + ">"


def redact(text: str, findings: list[Finding]) -> str:
    """`text` with each finding replaced by its placeholder."""
    parts, position = [], 0
    for finding in findings:
        parts += [text[position : finding.start], placeholder(finding.type)]
        position = finding.end
    parts.append(text[position:])
    return "".join(parts)
