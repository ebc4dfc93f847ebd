# Container images of the kit. The top Makefile includes this file (`include docker/images.mk`);
# it also works alone: `make -f docker/images.mk image-wanda`.
#
# Targets; <m> is a method, <image> an image of docker/images.py (either names an image for image-*):
#   image-<m> | image-<image>   build docker/Dockerfile for that image (BASE_IMAGE=... replaces the base;
#                               BASE_IMAGE=local: a debootstrapped base, no registry needed)
#   images                      build every image
#   image-smoke-<image>         run the image's smoke commands inside it (docker/images.py); results in $(RESULTS)
#   lock-<image>                regenerate docker/<image>/*.lock from its .in files (pip-compile, the image's python)
#   push-<image>                push the local build to $(REGISTRY) and record its digest in docker/images.lock.json
#   pull-<m>                    pull <registry>/<image>@<digest recorded in docker/images.lock.json>, and verify it
#   image-exists-<m>            exit 0 when an engine and a runnable image for <m> exist
#   runtime-<m>                 print `docker` when an engine and <m>'s image exist, else `local`
#   container-repro-<m>         `lpc repro <m> --profile $(PROFILE)` in the image, results into $(RESULTS)
# For the top Makefile:
#   $(call container_run,<m>,<command>)   a shell command that runs <command> in <m>'s image, e.g.
#                                         $(call container_run,wanda,lpc repro wanda --profile smoke)
#   $(call image_ready,<m>)               "yes" when image-exists-<m> would succeed, else empty
#   IMAGE_OF_<m>, IMAGE_METHODS, IMAGE_FAMILIES
# Runs use images by digest (the lock's digest, or the local build's image id), never a floating tag.

LPC_DOCKER_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
LPC_CONTAINER  := $(LPC_DOCKER_DIR)/container.sh

# The images are docker/images.py's table; which image serves which method comes from the method
# registry (methods/registry.py, `family`), joined by images.py, which refuses a method whose image
# is not in the table. Nothing here repeats either.
IMAGE_FAMILIES  := $(shell python3 $(LPC_DOCKER_DIR)/images.py list)
LPC_IMAGE_PAIRS := $(shell python3 $(LPC_DOCKER_DIR)/images.py pairs)
ifeq ($(strip $(IMAGE_FAMILIES)),)
$(error cannot read the images from docker/images.py (is python3 on PATH?))
endif
ifeq ($(strip $(LPC_IMAGE_PAIRS)),)
$(error cannot join methods/registry.py with docker/images.py: python3 docker/images.py pairs says why)
endif
lpc_pair_method = $(firstword $(subst :, ,$(1)))
lpc_pair_image  = $(lastword $(subst :, ,$(1)))
IMAGE_METHODS  := $(foreach p,$(LPC_IMAGE_PAIRS),$(call lpc_pair_method,$(p)))
$(foreach i,$(IMAGE_FAMILIES),$(eval IMAGE_OF_$(i) := $(i)))
$(foreach p,$(LPC_IMAGE_PAIRS),$(eval IMAGE_OF_$(call lpc_pair_method,$(p)) := $(call lpc_pair_image,$(p))))

# Settings: give them on the command line, in the environment or in the including Makefile
# (docker/container.sh documents each). Only the settings that are set are handed to the script
# (an empty HF_HOME must not leak anywhere).
LPC_CONTAINER_VARS := CONTAINER_ENGINE CONTAINER_ENGINE_FLAGS CONTAINER_BUILD_FLAGS BASE_IMAGE IMAGE_CONTEXT \
                      LPC_IMAGE LPC_IMAGES_LOCK CONTAINER_GPUS CONTAINER_RUN_FLAGS REGISTRY TAG LOCK_PYTHON \
                      HF_HOME LPC_CACHE CONTAINER_RESULTS_DIR
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
# profile reads the converted smoke model from $(LPC_CACHE) (mounted at /cache/lpc). When it is not
# there yet, its file is a prerequisite (the top Makefile converts it in the main venv); when it is,
# nothing is set up on the host: a run in an image needs no venv.
PROFILE ?= smoke
RESULTS ?= results/local
LPC_SMOKE_MODEL_STAMP ?= $(if $(LPC_CACHE),$(LPC_CACHE)/smollm2-135m-instruct/lpc_smoke.json)
lpc_smoke_model_if_missing = $(if $(wildcard $(LPC_SMOKE_MODEL_STAMP)),,$(LPC_SMOKE_MODEL_STAMP))

$(addprefix runtime-,$(IMAGE_METHODS)): runtime-%:
	@echo $(if $(call image_ready,$*),docker,local)

$(addprefix container-repro-,$(IMAGE_METHODS)): container-repro-%: \
		$(if $(filter smoke,$(PROFILE)),$(lpc_smoke_model_if_missing))
	@mkdir -p $(RESULTS)
	CONTAINER_RESULTS_DIR=$(abspath $(RESULTS)) \
	$(call container_run,$*,lpc repro $* --profile $(PROFILE) --results-dir /workspace/results)

$(addprefix image-smoke-,$(IMAGE_FAMILIES)): image-smoke-%: $(lpc_smoke_model_if_missing)
	@mkdir -p $(RESULTS)
	CONTAINER_RESULTS_DIR=$(abspath $(RESULTS)) $(call lpc_container,$*) smoke $*

IMAGE_TARGETS := $(sort $(foreach m,$(IMAGE_METHODS) $(IMAGE_FAMILIES),image-$(m)) \
                 $(foreach m,$(IMAGE_METHODS),pull-$(m) image-exists-$(m) runtime-$(m) container-repro-$(m)) \
                 $(foreach i,$(IMAGE_FAMILIES),image-smoke-$(i) lock-$(i) push-$(i)))
.PHONY: $(IMAGE_TARGETS) images

$(sort $(addprefix image-,$(IMAGE_METHODS) $(IMAGE_FAMILIES))): image-%:
	$(call lpc_container,$*) build $(IMAGE_OF_$*)

$(addprefix lock-,$(IMAGE_FAMILIES)): lock-%:
	$(call lpc_container,$*) lock $*

$(addprefix push-,$(IMAGE_FAMILIES)): push-%:
	@$(call lpc_container,$*) push $*

$(addprefix pull-,$(IMAGE_METHODS)): pull-%:
	@$(call lpc_container,$*) pull $(IMAGE_OF_$*)

$(addprefix image-exists-,$(IMAGE_METHODS)): image-exists-%:
	@$(call lpc_container,$*) exists $(IMAGE_OF_$*)

# Build every image once, one after the other (each is a multi-GB download).
images:
	@set -e; for f in $(IMAGE_FAMILIES); do $(call lpc_container,) build $$f; done
