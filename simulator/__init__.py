"""Simulator: fake Optimove API, fake bonus system, and a driver that plays Optimove.

Modules: ``optimove`` (WSGI app), ``campaigns`` (specs and row generation), ``limiter``,
``bonus`` and ``ledger`` (fake bonus system), ``server`` (run both), ``driver`` (campaigns
against a running relay). ``python -m simulator serve|drive`` is the command line.
"""
