"""The API surface later issues build on, and the AIP conventions it follows."""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor

from tunefleet.app.services import SERVICES

# Every RPC the service issues need, by service (issues 3, 4, 6, 7, 17 and 19).
REQUIRED_RPCS = {
    "datasets": {
        "UploadDataset",
        "GetDataset",
        "ListDatasets",
        "DeleteDataset",
        "PreviewDatasetRecords",
        "CheckContamination",
        "CreateDatasetLease",
        "DeleteDatasetLease",
        "ListDatasetLeases",
    },
    "training": {
        "CreateTrainingJob",
        "GetTrainingJob",
        "ListTrainingJobs",
        "CancelTrainingJob",
        "StreamTrainingJobEvents",
        "ListCheckpoints",
        "ReportTrainingProgress",
    },
    "adapters": {
        "CreateAdapter",
        "GetAdapter",
        "ListAdapters",
        "DeleteAdapter",
        "UploadAdapterVersion",
        "CreateAdapterVersion",
        "GetAdapterVersion",
        "ListAdapterVersions",
        "DeleteAdapterVersion",
        "DownloadAdapterVersion",
        "SetAdapterAlias",
        "SetAdapterAliasCanary",
        "DeleteAdapterAlias",
        "ListAdapterAliases",
        "ListAliasMoves",
        "WatchAdapterChanges",
        "MergeAdapterVersion",
        "QuantizeModelVersion",
    },
    "inference": {
        "Generate",
        "StreamGenerate",
        "ListServedAdapters",
        "LoadAdapter",
        "UnloadAdapter",
        "CreateFeedback",
        "ListFeedback",
        "ScoreCompletion",
    },
    "evaluation": {
        "CreateEvaluationJob",
        "GetEvaluationJob",
        "ListEvaluationJobs",
        "CancelEvaluationJob",
        "WatchEvaluationJob",
        "ListEvaluationItemResults",
        "CreateAnnotationTask",
        "CreateAnnotation",
        "GetAnnotationSummary",
    },
    "retraining": {
        "CreateRetrainingPolicy",
        "GetRetrainingPolicy",
        "ListRetrainingPolicies",
        "DeleteRetrainingPolicy",
        "CreateRetrainingRun",
        "GetRetrainingRun",
        "ListRetrainingRuns",
        "WatchRetrainingRun",
        "ApproveRetrainingRun",
        "RejectRetrainingRun",
        "CancelRetrainingRun",
    },
}

STREAMING = {  # method: (client streaming, server streaming)
    "UploadDataset": (True, False),
    "PreviewDatasetRecords": (False, True),
    "StreamTrainingJobEvents": (False, True),
    "UploadAdapterVersion": (True, False),
    "DownloadAdapterVersion": (False, True),
    "WatchAdapterChanges": (False, True),
    "StreamGenerate": (False, True),
    "WatchEvaluationJob": (False, True),
    "WatchRetrainingRun": (False, True),
}


def service(key: str) -> ServiceDescriptor:
    return SERVICES[key].descriptor


def test_every_needed_rpc_is_in_the_api() -> None:
    for key, rpcs in REQUIRED_RPCS.items():
        assert {m.name for m in service(key).methods} == rpcs, key


def test_streaming_shapes() -> None:
    for key in REQUIRED_RPCS:
        for method in service(key).methods:
            expected = STREAMING.get(method.name, (False, False))
            assert (method.client_streaming, method.server_streaming) == expected, method.full_name


def test_list_methods_paginate() -> None:
    for key in REQUIRED_RPCS:
        for method in service(key).methods:
            if not method.name.startswith("List"):
                continue
            request, response = method.input_type.fields_by_name, method.output_type.fields_by_name
            assert request["page_size"].type == FieldDescriptor.TYPE_INT32, method.full_name
            assert request["page_token"].type == FieldDescriptor.TYPE_STRING, method.full_name
            assert "next_page_token" in response, method.full_name


# Creates whose retry is safe without a request id: by the id the client chooses (the same id
# and holder return the lease that exists), by the task answered (the same answer again returns
# the first), or because a repeat costs nothing (a second annotation task left unanswered).
IDEMPOTENT_BY_ID = {
    "CreateDatasetLease": "lease_id",
    "CreateAnnotation": "annotation",
    "CreateAnnotationTask": "parent",
}


def test_creates_are_idempotent() -> None:
    for key in REQUIRED_RPCS:
        for method in service(key).methods:
            if method.name.startswith("Create"):
                field = IDEMPOTENT_BY_ID.get(method.name, "request_id")
                assert field in method.input_type.fields_by_name, method.full_name


def test_standard_methods_return_the_resource() -> None:
    for key in REQUIRED_RPCS:
        for method in service(key).methods:
            verb = next((v for v in ("Get", "Create") if method.name.startswith(v)), None)
            if verb:
                assert method.output_type.name == method.name.removeprefix(verb), method.full_name
            if method.name.startswith("Delete"):
                assert method.output_type.full_name == "google.protobuf.Empty", method.full_name


def test_states_are_nested_enums_with_unspecified_zero() -> None:
    from tunefleet.v1 import (
        adapter_pb2,
        dataset_pb2,
        evaluation_pb2,
        inference_pb2,
        training_job_pb2,
    )

    for message in (
        dataset_pb2.Dataset,
        training_job_pb2.TrainingJob,
        inference_pb2.ServedAdapter,
        evaluation_pb2.EvaluationJob,
    ):
        state = message.DESCRIPTOR.enum_types_by_name["State"]
        assert state.values_by_number[0].name == "STATE_UNSPECIFIED"
    assert adapter_pb2.AdapterVersion.DESCRIPTOR.enum_types_by_name["Kind"].values[0].number == 0
