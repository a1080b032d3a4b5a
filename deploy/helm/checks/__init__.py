"""The checks behind ``deploy/helm/check.py``, one module per responsibility.

``model``: the chart's paths and constants, the rendered-object model and its helpers;
``render``: rendering, ``helm lint`` and Kubernetes schema validation (Helm's Go SDK through
``helm-python-sdk``, ``kubernetes-validate``); ``policies``: the platform's policies over a rendered
release; ``custom_resources``: the shape of the custom resources that have no Kubernetes schema;
``hadolint``: the Dockerfile linter. ``deploy/helm/check.py`` is the command line and re-exports
every public name, so importers use that module, not these.
"""
