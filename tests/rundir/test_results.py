"""result.json's schema: what validate_result refuses, and the names it gives."""

from __future__ import annotations

import pytest
from synthetic import TASKS, synthetic_result

from metaspo_hf.errors import MetaspoError
from metaspo_hf.results import validate_result


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (("costs", "cache_hits"), "missing key 'costs.cache_hits'"),
        (("scores", TASKS[0], "metaspo", "sd"), f"missing key 'scores.{TASKS[0]}.metaspo.sd'"),
        (("optimized_system_prompt",), "missing key 'optimized_system_prompt'"),
    ],
)
def test_validate_result_names_the_missing_key(path, message):
    result = synthetic_result()
    container = result
    for key in path[:-1]:
        container = container[key]
    del container[path[-1]]
    with pytest.raises(MetaspoError) as caught:
        validate_result(result)
    assert message in caught.value.message


def test_validate_result_names_a_wrongly_typed_value():
    result = synthetic_result()
    result["scores"][TASKS[1]]["cot"]["n"] = "ten"
    with pytest.raises(MetaspoError, match=f"'scores.{TASKS[1]}.cot.n' should be an integer"):
        validate_result(result)
