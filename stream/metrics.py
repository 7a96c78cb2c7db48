"""Prometheus metrics of every agent, served by ``genco serve`` on GENCO_METRICS_PORT.

The agents run in separate processes, so the client library's multiprocess mode
is used: ``genco serve`` sets PROMETHEUS_MULTIPROC_DIR before any agent starts.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_IN = Counter("genco_events_in", "Messages consumed from input topics", ["topic"])
DEAD_LETTERS = Counter("genco_dead_letters", "Invalid messages sent to the dead-letter topic", ["topic", "reason"])
BAGS_OUT = Counter("genco_bags_out", "Bags emitted by the joiner", ["clicked"])
DUPLICATES = Counter("genco_duplicates_skipped", "Repeated messages recognised and ignored", ["kind"])
ORPHAN_CLICKS = Counter("genco_orphan_clicks", "Clicks dropped because their impression never arrived")
PENDING_IMPRESSIONS = Gauge("genco_pending_impressions", "Impressions waiting for their window to close",
                            multiprocess_mode="livesum")
WATERMARK = Gauge("genco_join_watermark_seconds", "Event time up to which windows are closed",
                  multiprocess_mode="livemax")
TRAINING_STEPS = Counter("genco_training_steps", "Optimiser steps taken by the learner")
TRAINED_BAGS = Counter("genco_trained_bags", "Bags the learner trained on (each impression once)")
SNAPSHOT_VERSION = Gauge("genco_snapshot_version", "Newest snapshot the learner published",
                         multiprocess_mode="livemax")
MODEL_VERSION = Gauge("genco_model_version", "Snapshot version the selector serves", multiprocess_mode="livemax")
MODEL_LOADED_AT = Gauge("genco_model_loaded_timestamp_seconds", "When the served snapshot was loaded",
                        multiprocess_mode="livemax")
SNAPSHOT_LOAD_FAILURES = Counter("genco_snapshot_load_failures", "Snapshots the selector could not load (it kept "
                                 "serving the one before), checkpoints the learner could not resume from")
SELECTIONS = Counter("genco_selections", "Selection responses sent", ["policy"])
SELECTION_LATENCY = Histogram("genco_selection_latency_seconds", "Request consumed -> response sent",
                              buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0))
CONSUMER_LAG = Gauge("genco_consumer_lag", "Messages not yet consumed, by agent and topic", ["agent", "topic"],
                     multiprocess_mode="livesum")
LAST_FETCH = Gauge("genco_agent_last_fetch_timestamp_seconds", "When the agent's consumer last returned from a fetch",
                   ["agent"], multiprocess_mode="livemax")
AGENT_RESTARTS = Counter("genco_agent_restarts", "Times genco serve restarted an agent that had exited", ["agent"])
AGENT_RECENT_RESTARTS = Gauge("genco_agent_recent_restarts", "Restarts of the agent in the last 10 minutes",
                              ["agent"], multiprocess_mode="livemax")
AGENT_LAST_EXIT = Gauge("genco_agent_last_exit_timestamp_seconds", "When the agent last exited unasked, by exit status",
                        ["agent", "status"], multiprocess_mode="max")
AGENT_LAST_ERROR = Gauge("genco_agent_last_error_timestamp_seconds",
                         "When an error stopped the agent, by the error's Python class name", ["agent", "error"],
                         multiprocess_mode="max")
AGENT_READY = Gauge("genco_agent_ready", "1 once the agent has its input partitions assigned (live agents only)",
                    ["agent"], multiprocess_mode="livemax")
PROGRESSIVE_LOGLOSS = Gauge("genco_progressive_logloss", "Log loss of each bag scored before training on it",
                            multiprocess_mode="livemax")
POLICY_SCTR = Gauge("genco_policy_sctr", "Each readout's calibrated sCTR on the explore slice, as the learner's "
                    "referee judges it (faded; learner/referee.py)", ["policy"], multiprocess_mode="livemax")
POLICY_SCTR_SE = Gauge("genco_policy_sctr_se", "Standard error of genco_policy_sctr", ["policy"],
                       multiprocess_mode="livemax")
SERVING_POLICY = Gauge("genco_serving_policy", "1 for the readout the selector serves (the snapshot names it), "
                       "0 for the others", ["policy"], multiprocess_mode="livemax")
