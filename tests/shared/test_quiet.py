"""fluxkit.shared.quiet: only the named library noise goes; the same text at ERROR, other messages of the same
loggers, and other warnings of the same category all still reach the user."""

import logging
import warnings

import pytest

from fluxkit.shared import quiet


@pytest.fixture
def installed():
    """quiet.install() for one test, undone after it (it changes process-wide logging and warnings)."""
    chatty = {name: logging.getLogger(name).level for name in quiet.CHATTY_AT_INFO}
    with warnings.catch_warnings():
        assert quiet.install(verbose=False)
        yield
    for name in quiet.LOG_NOISE:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, quiet._DropMessages)]:
            logger.removeFilter(f)
    for name, level in chatty.items():
        logging.getLogger(name).setLevel(level)


def test_named_noise_goes_and_nothing_else(installed, caplog):
    caplog.set_level(logging.INFO)
    name, pieces = "diffusers.loaders.lora_base", quiet.LOG_NOISE["diffusers.loaders.lora_base"]
    noise = f"{pieces[0]}: nothing to load"
    logger = logging.getLogger(name)
    logger.warning(noise)
    logger.info(noise)
    assert caplog.records == []
    logger.error(noise)  # the same text as an error is never hidden
    logger.critical(noise)
    logger.warning("Loading adapter weights failed for some keys")  # another message of that logger
    logging.getLogger("diffusers.models.other").warning(noise)  # the same text from another logger
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        (name, "ERROR", noise), (name, "CRITICAL", noise), (name, "WARNING", "Loading adapter weights failed for some keys"),
        ("diffusers.models.other", "WARNING", noise)]

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install(verbose=False)  # catch_warnings(record) reset the filters; idempotent for the loggers
        assert sum(isinstance(f, quiet._DropMessages) for f in logger.filters) == 1
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated, use ...", FutureWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated, use ...", UserWarning)
        warnings.warn("some other future change", FutureWarning)
    assert [(w.category, str(w.message)) for w in seen] == [
        (UserWarning, "`torch.distributed.all_gather_into_tensor` is deprecated, use ..."),
        (FutureWarning, "some other future change")]


@pytest.fixture
def no_earlier_install():
    """The noise loggers without the filters an earlier quiet.install() in this process left (an in-process
    run before this test on the same worker), put back after it."""
    removed = []
    for name in quiet.LOG_NOISE:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, quiet._DropMessages)]:
            logger.removeFilter(f)
            removed.append((logger, f))
    yield
    for logger, f in removed:
        logger.addFilter(f)


def test_verbose_keeps_everything(no_earlier_install, caplog):
    caplog.set_level(logging.INFO)
    assert quiet.install(verbose=True) is False
    logger = logging.getLogger("diffusers.models.modeling_utils")
    logger.warning("modules that should be kept in float32: []")
    assert not any(isinstance(f, quiet._DropMessages) for f in logger.filters)
    assert [r.getMessage() for r in caplog.records] == ["modules that should be kept in float32: []"]
