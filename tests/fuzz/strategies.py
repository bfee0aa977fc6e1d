"""Hypothesis strategies for any protobuf message, built from its descriptor: every field absent
or set to a value drawn from hostile values (NUL and control characters, broken escapes, paths,
over-long names, undefined enum numbers, the numeric extremes, deeply nested Structs) mixed with
arbitrary ones, and names of resources that exist on the server under test, so that requests get
past the first check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t",
    "a\tb",
    "\n",
    "\r\n",
    "\x1b[31mred",
    "\x7f",
    "\u202e",
    "\ufeff",
    "\\",
    '"',
    '"\\q"',
    '"\\u12"',
    "%",
    "_",
    "*",
    "**",
    ".",
    "..",
    "/",
    "//",
    "~",
    "/etc",
    "/etc/passwd",
    "../../etc/passwd",
    "/dev/zero",
    "/proc/self/environ",
    "C:\\Windows",
    "file:///etc/passwd",
    "s3://bucket/key",
    "datasets/",
    "datasets/..",
    "trainingJobs/-1",
    "adapters/",
    "adapters/a/versions/0",
    "adapters/a/versions/99999999999999999999",
    "adapters/a@",
    "adapters/@prod",
    "adapters/a/aliases/",
    "feedback/",
    "a" * 64,
    "a" * 256,
    "a" * 300,
    "é" * 200,
    "\U0001f600" * 80,
    "x" * 5000,
    'state = "READY"',
    'state = "READY\t"',
    'name = "a\\q"',
    'name = "\\u0000"',
    "labels.team:*",
    "labels.:*",
    'labels.team = "\x00"',
    "rating < nan",
    "rating < 1e999",
    "create_time > 0",
    'display_name = "a" AND',
    "AND AND",
    "NOT a",
    "a = ",
    "=",
    "%00",
    "${jndi:ldap://x}",
    "'; DROP TABLE datasets; --",
    "1e308",
    "-0",
    "NaN",
    "null",
    "true",
]

INT_EDGES = [0, 1, -1, 2, 7, 255, 256, 4096, 65535, 2**31 - 1, -(2**31)]
INT64_EDGES = [*INT_EDGES, 2**32 - 1, 2**53 + 1, 2**63 - 1, -(2**63)]
FLOAT_EDGES = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    2.0,
    1e-300,
    1e300,
    float("inf"),
    float("-inf"),
    float("nan"),
]

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1, INT_EDGES),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1, INT_EDGES),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1, INT_EDGES),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1, [v for v in INT_EDGES if v >= 0] + [2**32 - 1]),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1, [v for v in INT_EDGES if v >= 0] + [2**32 - 1]),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1, INT64_EDGES),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1, INT64_EDGES),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1, INT64_EDGES),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1, [v for v in INT64_EDGES if v >= 0]),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1, [v for v in INT64_EDGES if v >= 0]),
}

MAX_DEPTH = 4


def strings(known: Sequence[str]) -> st.SearchStrategy[str]:
    text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
    return st.one_of(st.sampled_from(HOSTILE_STRINGS), st.sampled_from(list(known)), text)


def _struct_value(depth: int) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from([0, -1, 1e308, 2**53 + 1, 0.5]),
        st.sampled_from(HOSTILE_STRINGS),
    )
    if depth <= 0:
        return scalars
    inner = _struct_value(depth - 1)
    return st.one_of(
        scalars,
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from([*HOSTILE_STRINGS[:20], "rank", "epochs"]), inner, max_size=3
        ),
    )


def _nested(depth: int) -> struct_pb2.Value:
    """A list in a list ... `depth` deep, built without recursion."""
    value = struct_pb2.Value()
    inner = value
    for _ in range(depth):
        inner = inner.list_value.values.add()
    inner.number_value = 1
    return value


@st.composite
def struct(draw: st.DrawFn) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    if draw(st.integers(0, 9)) == 0:  # nesting past the parser's recursion limit
        message.fields["deep"].CopyFrom(_nested(draw(st.sampled_from([90, 200, 1000]))))
        return message
    document = draw(
        st.dictionaries(st.sampled_from([*HOSTILE_STRINGS, "rank"]), _struct_value(3), max_size=4)
    )
    message.update(document)
    return message


def _scalar(field: FieldDescriptor, known: Sequence[str]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return strings(known)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=64), st.sampled_from([b"", b"\x00" * 16, b"\xff" * 300])
        )
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.one_of(
            st.sampled_from(FLOAT_EDGES),
            st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64),
        )
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        defined = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(defined), st.sampled_from([-1, 99, 2**31 - 1]))
    low, high, edges = _INT_RANGES[kind]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _value(field: FieldDescriptor, known: Sequence[str], depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        return messages(field.message_type, known, depth - 1)
    return _scalar(field, known)


def messages(
    descriptor: Descriptor, known: Sequence[str], depth: int = MAX_DEPTH
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type with hostile and arbitrary field values."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Struct":
        return struct()
    if depth <= 0:
        return st.just(cls())

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        chosen = {
            oneof.name: draw(st.sampled_from([None, *oneof.fields])) for oneof in descriptor.oneofs
        }
        for field in descriptor.fields:
            if field.containing_oneof is not None:
                if chosen[field.containing_oneof.name] is not field:
                    continue
            elif not draw(st.booleans()):
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                key, value = (
                    field.message_type.fields_by_name["key"],
                    field.message_type.fields_by_name["value"],
                )
                entries = draw(
                    st.dictionaries(_scalar(key, known), _value(value, known, depth), max_size=3)
                )
                target = getattr(message, field.name)
                for k, v in entries.items():
                    if value.type == FieldDescriptor.TYPE_MESSAGE:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif field.is_repeated:
                items = draw(st.lists(_value(field, known, depth), max_size=3))
                target = getattr(message, field.name)
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    for item in items:
                        target.add().CopyFrom(item)
                else:
                    target.extend(items)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, field.name).CopyFrom(draw(_value(field, known, depth)))
            else:
                setattr(message, field.name, draw(_value(field, known, depth)))
        return message

    return build()
