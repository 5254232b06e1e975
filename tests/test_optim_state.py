"""An optimizer's state after `select_parameters` replaced the entries it trains: dropped when passed, warned about or
refused at its next step when not, with the whole messages."""

import logging
import os
import re
import warnings

import pytest
import torch
from test_selection import fresh, loader, train_steps

from spu_peft import optim_state, select_parameters
from spu_peft.optim_state import drop_state

FIX = (
    "Pass the optimizer to `select_parameters(..., optimizer=optimizer)`, which drops that state, or build the "
    "optimizer after selecting."
)


def test_drop_state_forgets_only_the_given_parameters_and_logs_how_many(caplog):
    a, b, c = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    optimizer = torch.optim.AdamW([a, b, c], lr=0.1)
    (a.sum() + b.sum() + c.sum()).backward()
    optimizer.step()
    with caplog.at_level(logging.INFO, logger="spu_peft.optim_state"):
        drop_state(optimizer, [a, b])
        drop_state(optimizer, [a])  # nothing left to drop: no line, no error
        drop_state(None, [c])
    assert caplog.messages == ["SPU: the support of 2 values tensors changed; their optimizer state starts afresh."]
    assert a not in optimizer.state and b not in optimizer.state and int(optimizer.state[c]["step"]) == 1


def stale_optimizer(optimizer_class=torch.optim.AdamW, **kwargs):
    """A model and an optimizer that trained it, then a selection the optimizer was not passed to."""
    model = fresh(modules_to_save=[], **kwargs)
    select_parameters(model, loader(0))
    optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, optimizer, [1])
    select_parameters(model, loader(2))
    return model, optimizer


def test_stale_state_is_warned_about_with_the_whole_message():
    model, optimizer = stale_optimizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(model, optimizer, [2])
    (warning,) = [w for w in caught if "stepping" in str(w.message)]
    assert warning.category is UserWarning
    assert str(warning.message) == (
        "AdamW is stepping 4 SPU values tensors with state (e.g. Adam's moments) from before `select_parameters` "
        f"replaced their entries: it belongs to the old entries. {FIX}"
    )


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines add frames to every call")
def test_the_stale_state_warning_points_at_the_step():
    model, optimizer = stale_optimizer()
    model(**loader(3)[0]).logits_per_image.pow(2).mean().backward()
    with pytest.warns(UserWarning, match="is stepping") as caught:
        optimizer.step()
    assert caught[0].filename == __file__


def test_stale_state_is_warned_about_once_even_when_that_step_fails():
    class FailingAdamW(torch.optim.AdamW):
        fail = False

        def step(self, closure=None):
            if self.fail:
                raise RuntimeError("the step failed")
            return super().step(closure)

    model, optimizer = stale_optimizer(FailingAdamW)
    optimizer.fail = True
    with pytest.warns(UserWarning, match="is stepping"), pytest.raises(RuntimeError, match="the step failed"):
        train_steps(model, optimizer, [2])
    optimizer.fail = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, optimizer, [3])


def test_stale_state_of_another_length_is_refused_with_the_whole_message():
    model, optimizer = stale_optimizer(budget="global")
    with pytest.raises(ValueError) as error:
        train_steps(model, optimizer, [2])
    pattern = (
        r"AdamW holds state of shape \{'exp_avg': \(\d+,\), 'exp_avg_sq': \(\d+,\)\} for SPU values of shape \(\d+,\): "
        r"`select_parameters` gave the adapter other entries \(a global budget resizes them\)\. "
    )
    assert re.fullmatch(pattern + re.escape(FIX), str(error.value))


def test_a_process_first_selection_makes_stale_state_caught():
    """The step hooks are torch's global ones, registered by the first selection of a process: with none
    registered yet, a selection registers them and the next stale step is caught."""
    for handle in optim_state._hooks:
        handle.remove()
    optim_state._hooks.clear()
    try:
        model, optimizer = stale_optimizer()
        with pytest.warns(UserWarning, match="is stepping"):
            train_steps(model, optimizer, [2])
    finally:
        for handle in optim_state._hooks:
            handle.remove()
        optim_state._hooks.clear()
        optim_state.watch_stale_state([])  # as this process had them
