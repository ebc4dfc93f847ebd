# Container images of the kit. The top Makefile includes this file (`include docker/images.mk`);
# it also works alone: `make -f docker/images.mk image-wanda`.
#
# Targets, for every method <m> that has an image:
#   image-<m>         build docker/<image>/Dockerfile with docker or podman (BASE_IMAGE=... replaces the base)
#   pull-<m>          pull $(REGISTRY)/<image>@<digest recorded in docker/images.lock.json>
#   image-exists-<m>  exit 0 when an engine and a runnable image for <m> exist
#   runtime-<m>       print `docker` when an engine and <m>'s image exist, else `local`
#   container-repro-<m>  `lpc repro <m> --profile $(PROFILE)` in the image, results into $(RESULTS)
# For the top Makefile:
#   $(call container_run,<m>,<command>)   a shell command that runs <command> in <m>'s image, e.g.
#                                         $(call container_run,wanda,lpc repro wanda --profile smoke)
#   $(call image_ready,<m>)               "yes" when image-exists-<m> would succeed, else empty
#   IMAGE_OF_<m>, IMAGE_METHODS, IMAGE_FAMILIES
# Runs use images by digest (the lock's digest, or the local build's image id), never a floating tag.

LPC_DOCKER_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
LPC_CONTAINER  := $(LPC_DOCKER_DIR)/container.sh

# Which image serves which method comes from the method registry (methods/registry.py, standard
# library only), as <method>:<image> pairs; nothing here repeats it.
LPC_IMAGE_PAIRS := $(shell python3 $(LPC_DOCKER_DIR)/../methods/registry.py images)
ifeq ($(strip $(LPC_IMAGE_PAIRS)),)
$(error cannot read the method -> image pairs from methods/registry.py (is python3 on PATH?))
endif
lpc_pair_method = $(firstword $(subst :, ,$(1)))
lpc_pair_image  = $(lastword $(subst :, ,$(1)))
IMAGE_METHODS  := $(foreach p,$(LPC_IMAGE_PAIRS),$(call lpc_pair_method,$(p)))
IMAGE_FAMILIES := $(sort $(foreach p,$(LPC_IMAGE_PAIRS),$(call lpc_pair_image,$(p))))
$(foreach p,$(LPC_IMAGE_PAIRS),$(eval IMAGE_OF_$(call lpc_pair_method,$(p)) := $(call lpc_pair_image,$(p))))

# Settings: give them on the command line, in the environment or in the including Makefile
# (docker/container.sh documents each). REGISTRY defaults to the one recorded in
# docker/images.lock.json by the release workflow (ghcr.io/<owner>/llm-pruning-kit).
# Only the settings that are set are handed to the script (an empty HF_HOME must not leak anywhere).
LPC_CONTAINER_VARS := CONTAINER_ENGINE CONTAINER_ENGINE_FLAGS BASE_IMAGE IMAGE_CONTEXT LPC_IMAGE \
                      CONTAINER_GPUS CONTAINER_RUN_FLAGS REGISTRY HF_HOME LPC_CACHE CONTAINER_RESULTS_DIR
lpc_container = $(strip $(foreach v,$(LPC_CONTAINER_VARS),$(if $($(v)),$(v)='$($(v))')) \
                LPC_METHOD=$(1)) $(LPC_CONTAINER)

# $(call container_run,<method>,<command>)
container_run = $(call lpc_container,$(1)) run $(IMAGE_OF_$(1)) -- $(2)
# $(call image_ready,<method>)
image_ready = $(if $(IMAGE_OF_$(1)),$(shell $(call lpc_container,$(1)) exists $(IMAGE_OF_$(1)) >/dev/null 2>&1 && echo yes))

# ---- what the top Makefile's repro-<m> calls ---------------------------------------------------
# runtime-<m> prints `docker` when an engine and <m>'s image exist, else `local`.
# container-repro-<m> runs `lpc repro <m> --profile $(PROFILE)` in the image; $(RESULTS) (default
# results/local) is mounted at /workspace/results, so the results land there on the host. The smoke
# profile reads the converted smoke model from $(LPC_CACHE) (mounted at /cache/lpc): when the
# including Makefile defines LPC_CACHE, its smoke-model file is a prerequisite (the top Makefile
# has the rule that makes it).
PROFILE ?= smoke
RESULTS ?= results/local
LPC_SMOKE_MODEL_STAMP ?= $(if $(LPC_CACHE),$(LPC_CACHE)/smollm2-135m-instruct/lpc_smoke.json)

$(addprefix runtime-,$(IMAGE_METHODS)): runtime-%:
	@echo $(if $(call image_ready,$*),docker,local)

$(addprefix container-repro-,$(IMAGE_METHODS)): container-repro-%: \
		$(if $(filter smoke,$(PROFILE)),$(LPC_SMOKE_MODEL_STAMP))
	@mkdir -p $(RESULTS)
	CONTAINER_RESULTS_DIR=$(abspath $(RESULTS)) \
	$(call container_run,$*,lpc repro $* --profile $(PROFILE) --results-dir /workspace/results)

IMAGE_TARGETS := $(foreach m,$(IMAGE_METHODS),image-$(m) pull-$(m) image-exists-$(m) runtime-$(m) container-repro-$(m))
.PHONY: $(IMAGE_TARGETS) images

$(addprefix image-,$(IMAGE_METHODS)): image-%:
	$(call lpc_container,$*) build $(IMAGE_OF_$*)

$(addprefix pull-,$(IMAGE_METHODS)): pull-%:
	@$(call lpc_container,$*) pull $(IMAGE_OF_$*)

$(addprefix image-exists-,$(IMAGE_METHODS)): image-exists-%:
	@$(call lpc_container,$*) exists $(IMAGE_OF_$*)

# Build every image once.
images:
	@set -e; for f in $(sort $(IMAGE_FAMILIES)); do $(call lpc_container,) build $$f; done
