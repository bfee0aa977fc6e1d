"""Detection and redaction of personal data and secrets in text.

Each detector is a regular expression with a check where the pattern alone would flag ordinary
numbers, and every pattern stands on boundaries that keep it out of code and math: a number is
not taken from inside a word, a hash or a decimal (`275.4339788461538` is not a card, `v1.2.3.4`
is not an address), and `::` or `[::-1]` is not an IPv6 address. Card numbers must pass the Luhn
check and carry a card network's prefix and length; IBANs a known country's length and the ISO
13616 mod-97 check; IP addresses must parse (IPv6 with three groups at least). Phone numbers are
found by Google's libphonenumber (the `phonenumbers` package), which knows every country's
numbering plan and skips dates and times; a match also has to be written like a phone number.
Detectors whose pattern needs a particular character are skipped cheaply when the text lacks it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

import phonenumbers

from tunefleet.v1.dataset_pb2 import PiiType

# National numbers without a `+` are read as numbers of this region; international ones (with
# their `+` and country code) are found whatever it is.
PHONE_REGION = "US"


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


# (prefix range, lengths) of the card networks: Visa, Mastercard, American Express, Discover,
# JCB, Diners Club, UnionPay, Maestro. A Luhn-valid digit run of another shape is not a card.
_NETWORKS: tuple[tuple[int, int, tuple[int, ...]], ...] = (
    (4, 4, (13, 16, 19)),
    (51, 55, (16,)),
    (2221, 2720, (16,)),
    (34, 34, (15,)),
    (37, 37, (15,)),
    (6011, 6011, (16, 17, 18, 19)),
    (644, 649, (16, 17, 18, 19)),
    (65, 65, (16, 17, 18, 19)),
    (3528, 3589, (16, 17, 18, 19)),
    (300, 305, (14, 16, 17, 18, 19)),
    (36, 36, (14, 16, 17, 18, 19)),
    (38, 39, (16, 17, 18, 19)),
    (62, 62, (16, 17, 18, 19)),
    (50, 50, (12, 13, 14, 15, 16, 17, 18, 19)),
    (56, 58, (12, 13, 14, 15, 16, 17, 18, 19)),
    (67, 67, (12, 13, 14, 15, 16, 17, 18, 19)),
)


def _card(match: str) -> bool:
    digits = re.sub(r"[ -]", "", match)
    if not (13 <= len(digits) <= 19 and len(set(digits)) > 1 and _luhn(digits)):
        return False
    return any(
        low <= int(digits[: len(str(low))]) <= high and len(digits) in lengths
        for low, high, lengths in _NETWORKS
    )


# IBAN length per country (the SWIFT IBAN registry).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def _iban(match: str) -> bool:
    compact = match.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in rearranged)
    return int(number) % 97 == 1


def _ssn(match: str) -> bool:
    area, group, serial = match.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _written_like_a_phone(match: str) -> bool:
    """An international prefix, an area code in brackets, or at least two separators between
    digit groups: a bare run of digits (an id, a timestamp, INT_MAX) is not taken for a phone."""
    return match.startswith("+") or "(" in match or len(re.findall(r"\d[ .\-]\(?\d", match)) >= 2


# A version, a package pin or a dependency spec just before four dotted numbers.
_VERSION_CONTEXT = re.compile(r"(?i)(?:\bv|\bversion|\bver\.?|\brelease|==|>=|<=|~=|@)\s*$")


def _ipv4(match: str) -> bool:
    try:
        address = ipaddress.IPv4Address(match)
    except ValueError:
        return False
    # Loopback, 0.0.0.0, netmasks and multicast name no one; private addresses stay (they map a
    # network's hosts).
    return not (
        address.is_loopback or address.is_unspecified or address.is_multicast or address.is_reserved
    ) and not match.startswith("255.")


def _ipv6(match: str) -> bool:
    if sum(1 for group in match.split(":") if group) < 3:
        return False  # `::`, `[1::2]`, `a::b`: slices and scope operators, not addresses
    try:
        address = ipaddress.IPv6Address(match)
    except ValueError:
        return False
    return not (address.is_loopback or address.is_unspecified or address.is_multicast)


@dataclass(frozen=True)
class Detector:
    type: PiiType.ValueType
    pattern: re.Pattern[str]
    needs: str  # a substring the text must contain for the pattern to have a chance; "" = digits
    check: Callable[[str], bool] | None = None


# Digits that are not part of a word, a hash or a decimal: nothing alphanumeric (or a joining `-`)
# right before or after, and no decimal point between digits.
_NUMBER_START = r"(?<![\w\-])(?<!\d[.,])"
_NUMBER_END = r"(?![\w\-])(?![.,]\d)"

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
        # Not `git@github.com` (a service account in every clone URL), not `x@w.transpose()`.
        re.compile(
            r"\b(?!git@)[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"
            r"(?![(\[])"
        ),
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
        re.compile(_NUMBER_START + r"\d(?:[ \-]?\d){12,18}" + _NUMBER_END),
        "",
        _card,
    ),
    Detector(
        PiiType.PII_TYPE_US_SSN,
        re.compile(_NUMBER_START + r"\d{3}-\d{2}-\d{4}" + _NUMBER_END),
        "",
        _ssn,
    ),
    Detector(
        PiiType.PII_TYPE_IPV6,
        re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])"),
        ":",
        _ipv6,
    ),
    Detector(
        PiiType.PII_TYPE_IPV4,
        re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w])(?!\.\d)"),
        ".",
        _ipv4,
    ),
)

# Where a phone number may be: libphonenumber reads the text around each candidate.
_PHONE_CANDIDATE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{1,4}(?:[ .\-]?\d{2,4}){1,4}(?!\w)"
)
_PHONE_CONTEXT = 24
_DIGITS = re.compile(r"\d")


def _phones(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for candidate in _PHONE_CANDIDATE.finditer(text):
        if not _written_like_a_phone(candidate.group()):
            continue
        low = max(0, candidate.start() - _PHONE_CONTEXT)
        window = text[low : candidate.end() + _PHONE_CONTEXT]
        for match in phonenumbers.PhoneNumberMatcher(
            window, PHONE_REGION, leniency=phonenumbers.Leniency.VALID
        ):
            start, end = low + match.start, low + match.end
            overlaps = start < candidate.end() and candidate.start() < end
            if overlaps and _written_like_a_phone(match.raw_string) and (start, end) not in spans:
                spans.append((start, end))
    return spans


def _claim(findings: list[Finding], kind: PiiType.ValueType, start: int, end: int) -> None:
    if not any(f.start < end and start < f.end for f in findings):
        findings.append(Finding(kind, start, end))


def find(text: str) -> list[Finding]:
    """Every finding in `text`, earliest first; a span claimed by an earlier detector (in the
    order above, then phone numbers) is not reported again by a later one."""
    findings: list[Finding] = []
    has_digits = _DIGITS.search(text) is not None
    for detector in DETECTORS:
        if not (detector.needs in text if detector.needs else has_digits):
            continue
        for match in detector.pattern.finditer(text):
            if detector.check is not None and not detector.check(match.group()):
                continue
            if detector.type == PiiType.PII_TYPE_IPV4 and _VERSION_CONTEXT.search(
                text, max(0, match.start() - 12), match.start()
            ):
                continue
            _claim(findings, detector.type, *match.span())
    if has_digits:
        for start, end in _phones(text):
            _claim(findings, PiiType.PII_TYPE_PHONE, start, end)
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
