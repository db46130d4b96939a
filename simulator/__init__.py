"""Simulator: fake Optimove API, fake bonus system, fake send service, and drivers that play Optimove.

Modules: ``optimove`` (WSGI app), ``campaigns`` (specs and row generation), ``limiter``,
``peer`` and ``ledger`` (the machinery of the fake peers), ``bonus`` and ``send`` (the fake
bonus system and send service), ``server`` (run them all), ``driver`` (campaigns against a
running relay), ``send_driver`` (flow 1), ``conditional_driver`` (flow 4 and cancellations),
``realtime`` (real-time triggers against a running relay).
``python -m simulator serve|drive`` is the command line.
"""
