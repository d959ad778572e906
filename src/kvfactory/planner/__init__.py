"""Planning without hardware: KV math, capacity plans and offline trace simulation.

* ``kvmath``, ``models``, ``hardware``: KV bytes per token (GQA and MLA), prefill cost,
  load-versus-recompute break-even; model presets and a ``config.json`` reader; hardware
  presets with cited specs.
* ``plan``: the analytic capacity plan (sessions per tier, state at 1x and 10x traffic).
* ``trace``, ``simulator``, ``belady``, ``replay``: Mooncake traces replayed through the
  store's real policy classes, against the unbounded and Belady-optimal limits.
* ``report``, ``specs``, ``commands``: rendering, parsing and the ``simulate``/``plan``
  commands (``commands.register(app)``).

Imports only the base layer and the store's policy side (``kvfactory.store.policy`` and
the modules it is built from), never tiers' storage, engines or the web stack.
"""
