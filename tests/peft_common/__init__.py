"""peft's common tests (``tests/testing_common.py``'s ``PeftCommonTester`` and ``tests/test_custom_models.py``),
ported onto orthotune's API and run for every registered method on six model kinds, at peft's tolerances.

``models.py`` builds the models, ``cases.py`` holds the (method, model kind, config) table with every
deviation from peft and its reason, ``harness.py`` the shared steps; the ``test_*.py`` files hold the
behaviours, each named after the peft test it ports.
"""
