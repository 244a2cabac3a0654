"""The gateway's Prometheus metrics, in one place so names and labels stay consistent."""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram

R = TypeVar("R")

# Latency buckets from 5 ms (a cached first token on a fast GPU) to 10 min (request_timeout_s).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 600.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.5, 1.0, 2.5, 5.0)

# The gateway's own time per request: fine around its goal (2 ms), coarse up to where something is wrong.
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.0025, 0.003,
                     0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

REQUESTS = Counter("splitserve_gateway_requests_total", "Finished requests by endpoint and status",
                   ["endpoint", "status"])


def count_response(endpoint: str, response: R) -> R:
    """Counts a finished HTTP response (anything with a status_code) in REQUESTS; returns it."""
    REQUESTS.labels(endpoint, str(response.status_code)).inc()  # type: ignore[attr-defined]
    return response


IN_FLIGHT = Gauge("splitserve_gateway_requests_in_flight", "Requests being served now")
QUEUED = Gauge("splitserve_gateway_requests_queued", "Requests waiting for one of the max_in_flight slots")
SHED = Counter("splitserve_gateway_requests_shed_total",
               "Requests refused (429 / RESOURCE_EXHAUSTED) because max_in_flight ran and max_queued waited")
REJECTED_INPUT = Counter("splitserve_gateway_rejected_requests_total",
                         "Requests refused before any work, by reason (body_too_large, prompt_too_large, "
                         "invalid_unicode)", ["reason"])
TTFT = Histogram("splitserve_gateway_time_to_first_token_seconds",
                 "From request arrival to its first generated token", buckets=_LATENCY_BUCKETS)
INTER_TOKEN = Histogram("splitserve_gateway_inter_token_latency_seconds",
                        "Between consecutive token batches of one sequence, per token", buckets=_ITL_BUCKETS)
E2E = Histogram("splitserve_gateway_e2e_request_latency_seconds", "From request arrival to its last token",
                buckets=_LATENCY_BUCKETS)
OVERHEAD = Histogram("splitserve_gateway_overhead_seconds",
                     "The gateway's own time per successful request: its handling time less its waits on the "
                     "tokenizer and workers (and for a max_in_flight slot)", buckets=_OVERHEAD_BUCKETS)
TOOL_CALL_PARSE_FAILURES = Counter("splitserve_gateway_tool_call_parse_failures_total",
                                   "Outputs whose tool call could not be parsed and went to the content (or was "
                                   "cut short), by parser and reason", ["parser", "reason"])
PROMPT_TOKENS = Counter("splitserve_gateway_prompt_tokens_total", "Prompt tokens of accepted requests")
GENERATION_TOKENS = Counter("splitserve_gateway_generation_tokens_total", "Tokens generated and returned")
ROUTER_DECISIONS = Counter("splitserve_router_decisions_total", "Worker choices by the router",
                           ["kind", "reason"])
LOCAL_PREFILL = Counter("splitserve_gateway_local_prefill_total",
                        "Requests prefilled by their decode worker instead of a prefill worker", ["reason"])
PREFILL_PATH = Counter("splitserve_gateway_prefill_path_total",
                       "Where prompts were prefilled (local: the decode worker; remote: a prefill worker), by why: "
                       "predicted_faster, probe (a close slower path taken to re-measure its worker), cold_start, "
                       "threshold, below_threshold, no_prefill_worker, prefill_failed",
                       ["path", "reason"])
PREFILL_PATH_TTFT_RATIO = Histogram(
    "splitserve_gateway_prefill_path_ttft_ratio",
    "Per predicted path choice: the chosen path's measured time to the first token over the time predicted for it "
    "(1: exact; far from 1: the queues or rates the choice weighed mislead it)", ["path"],
    buckets=(0.1, 0.25, 0.5, 0.8, 1.25, 2.0, 4.0, 10.0))
WORKER_FAILURES = Counter("splitserve_gateway_worker_failures_total",
                          "Calls to a worker that failed, by worker kind and gRPC code", ["kind", "code"])
TOKENIZER_RETRIES = Counter("splitserve_gateway_tokenizer_retries_total",
                            "Tokenizer calls retried on another replica after theirs was down, by method",
                            ["method"])
DECODE_RETRIES = Counter("splitserve_gateway_decode_retries_total",
                         "Decode streams retried on another worker after a failure before any token")
DECODE_MIGRATIONS = Counter("splitserve_gateway_decode_migrations_total",
                            "Decode streams that failed mid-stream, by the failure (resumed on another worker) or by "
                            "why they could not be resumed (limit_reached, no_other_worker)", ["reason"])
HEALTHY_WORKERS = Gauge("splitserve_gateway_healthy_workers", "Workers passing health checks", ["kind"])
SLOW_HEALTH_CHECKS = Counter("splitserve_gateway_slow_health_checks_total",
                             "Worker health checks that timed out (the worker stays routed while it makes progress)",
                             ["kind"])
WORKER_REJECTIONS = Counter("splitserve_gateway_worker_rejections_total",
                            "Workers refused admission: no or wrong membership proof, another model, no Stats",
                            ["kind", "reason"])
DISCOVERY_ERRORS = Counter("splitserve_gateway_discovery_errors_total",
                           "Failed reads of the worker registry in Redis (static workers are still used)")
PREFIX_INDEX_UP = Gauge("splitserve_router_prefix_index_up",
                        "1 while the Redis prefix index answers lookups, 0 while requests are routed by load only")
LOAD_ONLY_ROUTING = Counter("splitserve_router_load_only_total",
                            "Requests routed by load alone because the prefix index could not answer in time, by "
                            "the outage's reason (timeout, redis_error)", ["reason"])
PREDICTED_CACHED_TOKENS = Counter("splitserve_router_predicted_cached_tokens_total",
                                  "Prompt tokens the prefix index said the chosen worker holds", ["kind"])
SPECULATIVE_CLAIM_FAILURES = Counter("splitserve_router_speculative_claim_failures_total",
                                    "Claims of a just-routed prompt for its worker that Redis did not take in time "
                                    "(the next request sharing its prefix is routed without it)")
# predicted - reported cached tokens of one request: negative where the index missed hits, positive where it
# promised blocks the worker did not reuse.
_GAP_BUCKETS = (-16384, -4096, -1024, -256, -64, -16, -1, 0, 16, 64, 256, 1024, 4096, 16384)
PREDICTION_GAP = Histogram("splitserve_router_prediction_gap_tokens",
                           "Per request: cached tokens the prefix index predicted on the chosen worker minus those "
                           "the worker reported", ["kind"], buckets=_GAP_BUCKETS)
FEEDBACK_PREDICTED_TOKENS = Counter("splitserve_router_feedback_predicted_tokens_total",
                                    "Cached tokens predicted for requests whose worker then reported its own count",
                                    ["kind"])
FEEDBACK_REALISED_TOKENS = Counter("splitserve_router_feedback_realised_tokens_total",
                                   "Of those predicted tokens, how many the worker reported reusing", ["kind"])
PREDICTION_AGREEMENT = Gauge("splitserve_router_prediction_agreement",
                             "Predicted vs reported cached tokens over the recent requests with hits: "
                             "sum(min) / sum(max), 1 when the prefix index is exact")
ROUTING_DEGRADED = Gauge("splitserve_router_routing_degraded",
                         "1 while prefix routing is off (requests routed by load, a few by prefix as probes) because "
                         "predicted cached tokens disagree with the workers' reports")
ROUTING_DEGRADATIONS = Counter("splitserve_router_routing_degradations_total",
                               "Times prefix routing was turned off by the accuracy feedback, by reason", ["reason"])
