"""Prometheus metrics of dataset ingestion."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tunefleet.datasets.pipeline import IngestResult, ValidationReport
from tunefleet.v1 import dataset_pb2


class DatasetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.accepted = Counter(
            "tunefleet_dataset_records_accepted",
            "Records that passed validation.",
            registry=registry,
        )
        self.rejected = Counter(
            "tunefleet_dataset_records_rejected",
            "Records rejected by validation, by error code.",
            ["code"],
            registry=registry,
        )
        self.duplicates = Counter(
            "tunefleet_dataset_duplicates_removed",
            "Records removed as duplicates, by kind (exact or near).",
            ["kind"],
            registry=registry,
        )
        self.pii = Counter(
            "tunefleet_dataset_pii_found",
            "PII findings, by type.",
            ["type"],
            registry=registry,
        )
        self.bytes = Counter(
            "tunefleet_dataset_ingested_bytes",
            "Bytes of uploaded files processed.",
            registry=registry,
        )
        self.duration = Histogram(
            "tunefleet_dataset_ingest_duration_seconds",
            "Time from the first byte of an upload to its dataset.",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=registry,
        )
        self.records_per_second = Gauge(
            "tunefleet_dataset_last_ingest_records_per_second",
            "Records read per second by the most recent ingestion.",
            registry=registry,
        )
        self.bytes_per_second = Gauge(
            "tunefleet_dataset_last_ingest_bytes_per_second",
            "Bytes read per second by the most recent ingestion.",
            registry=registry,
        )
        # At zero from the start, so that a first rejection, duplicate or finding is an increase.
        for code in dataset_pb2.RecordErrorCode.keys():  # noqa: SIM118
            if code != "RECORD_ERROR_CODE_UNSPECIFIED":
                self.rejected.labels(code.removeprefix("RECORD_ERROR_CODE_"))
        for kind in ("exact", "near"):
            self.duplicates.labels(kind)
        for pii in dataset_pb2.PiiType.keys():  # noqa: SIM118
            if pii != "PII_TYPE_UNSPECIFIED":
                self.pii.labels(pii.removeprefix("PII_TYPE_"))

    def observe_rejected(self, report: ValidationReport) -> None:
        """Count the records of an upload that was rejected as a whole."""
        self.accepted.inc(report.valid_records)
        for entry in report.counts:
            self.rejected.labels(entry["code"].removeprefix("RECORD_ERROR_CODE_")).inc(
                entry["count"]
            )

    def observe(self, result: IngestResult) -> None:
        self.observe_rejected(result.validation)
        report = result.validation
        self.duplicates.labels("exact").inc(result.cleaning.exact_duplicates_removed)
        self.duplicates.labels("near").inc(result.cleaning.near_duplicates_removed)
        for entry in result.cleaning.pii_counts:
            self.pii.labels(entry["type"].removeprefix("PII_TYPE_")).inc(entry["count"])
        self.bytes.inc(result.source_size_bytes)
        self.duration.observe(result.duration_seconds)
        seconds = max(result.duration_seconds, 1e-9)
        self.records_per_second.set(report.total_records / seconds)
        self.bytes_per_second.set(result.source_size_bytes / seconds)
