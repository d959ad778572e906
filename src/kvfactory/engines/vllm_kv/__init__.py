"""kvfactory inside vLLM: the pieces behind ``kvfactory.engines.vllm_connector``.

``plan`` decides, on vLLM's scheduler side, which chunks to load and save; ``paged`` moves
chunk bytes in and out of vLLM's paged KV tensors; ``identity`` names the model, layout
and tenant namespace; ``shared_store`` gives the scheduler and worker halves of the
connector one ``ContextStore`` per process. ``launcher`` and ``http_engine`` run stock
``vllm serve`` with the connector and front it with the kvfactory gateway.
"""
