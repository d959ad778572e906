"""Connector tests run vLLM's CPU build in child processes (see ``vllm_harness``)."""
