"""A third party's mii plugins: a float64 engine, a scheduler, and two hooks."""
import logging

from mii.plugins import LoadedModel, hookimpl

log = logging.getLogger("mii_thirdparty_test")


class Float64Engine:
    """Loads the model in float64 on CPU (exact, slow): observable through Info."""

    name = "float64"

    def setup_distributed(self, rank):
        raise RuntimeError("float64 engine: no tensor parallelism")

    def load(self, model_config, rank):
        import torch  # imported here: hook-only processes (load balancer) stay light
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_config.model_name_or_path,
                                                     dtype=torch.float64).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer)
        return LoadedModel(model, tokenizer, torch.device("cpu"),
                           model.config.max_position_embeddings, "float64 engine (third party)")


class HighestFirstScheduler:
    """Always the healthy replica with the highest index."""

    name = "highest_first"

    def __init__(self, replica_count):
        self.replica_count = replica_count

    def pick(self, candidates):
        return max(candidates)

    def started(self, replica):
        pass

    def finished(self, replica):
        pass

    @hookimpl
    def mii_validate_config(self, mii_config):
        """A scheduler's own check, called by serve() because it is the chosen scheduler."""
        if mii_config.model_conf.replica_num < 2:
            raise ValueError("highest_first needs replica_num >= 2")


@hookimpl
def mii_adjust_config(mii_config):
    """Honour a custom key: inference_engine_config={'thirdparty_max_batch': N}."""
    extra = mii_config.model_conf.inference_engine_config.get("thirdparty_max_batch")
    if extra:
        mii_config.model_conf.max_batch_size = int(extra)


@hookimpl
def mii_engine_loaded(model_config, loaded, rank):
    log.info("thirdparty hook saw %s on rank %d (max_batch_size=%s)", loaded.description,
             rank.rank, model_config.max_batch_size)
