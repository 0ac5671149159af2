"""Benchmarks: ``python -m kimi_lab.bench <name>`` runs ``kimi_lab.bench.<name>.main(argv)`` (see ``make bench``)."""
