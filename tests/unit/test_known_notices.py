"""megatron_eps silences exactly the known notices of megatron_eps.known_notices."""

import os
import subprocess
import sys
import warnings

import pytest

from megatron_eps import known_notices

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shown(message, category, module, warnoptions=()):
    """The warnings that reach the user when ``module`` warns ``message``, after
    silence_known_notices() under the given interpreter warning options."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        saved, sys.warnoptions = sys.warnoptions, list(warnoptions)
        try:
            known_notices.silence_known_notices()
        finally:
            sys.warnoptions = saved
        warnings.warn_explicit(message, category, module + ".py", 1, module=module)
    return [str(w.message) for w in caught]


TE_NOTICE = ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
             UserWarning, "megatron.core.optimizer")


@pytest.mark.parametrize("message,category,module", [
    TE_NOTICE,
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends"),
    ("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
     UserWarning, "megatron.core.transformer.transformer_config"),
])
def test_known_notices_are_silenced(message, category, module):
    assert _shown(message, category, module) == []


@pytest.mark.parametrize("message,category,module", [
    # another message of the same module
    ("Transformer Engine is not installed. Please use local Bert layer spec instead.",
     UserWarning, "megatron.core.models.bert.bert_layer_specs"),
    # the same message from a module outside megatron.core
    (TE_NOTICE[0], UserWarning, "my_training_script"),
    # the same message as another category
    (TE_NOTICE[0], RuntimeWarning, TE_NOTICE[2]),
])
def test_other_warnings_still_show(message, category, module):
    assert _shown(message, category, module) == [message]


def test_python_warning_options_win():
    assert _shown(*TE_NOTICE, warnoptions=["default"]) == [TE_NOTICE[0]]


@pytest.mark.slow
def test_importing_megatron_core_after_megatron_eps_prints_nothing():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("PYTHONWARNINGS", None)
    code = ("import megatron_eps, megatron.core.optimizer, megatron.core.distributed, "
            "megatron.core.models.gpt.gpt_layer_specs")
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-2000:]
    loud = subprocess.run([sys.executable, "-W", "default", "-c", code], env=env,
                          capture_output=True, text=True, timeout=300)
    assert "Transformer Engine and Apex are not installed" in loud.stderr
