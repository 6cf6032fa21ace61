# mocod — build, test, bench.  `make`, `make test`, `make test SANITIZE=1`, `make bench`, `make run`.
#
# Sources are found by wildcard: a new module is a new src/<concern>/x.c with include/<concern>/x.h,
# a new test suite is tests/test_x.c defining `Suite *x_suite(void)`, a new benchmark tests/bench/bench_x.c.

CC      ?= cc
PKGS    := libuv openblas jansson check zlib ompi-c libmicrohttpd libpng libjpeg
MARCH   ?= -march=native
ifeq ($(SANITIZE),1)
BUILD   := build-asan
OPT     := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
else
BUILD   := build
OPT     := -O2 -g $(MARCH)
endif
BIN     := $(BUILD)/bin

PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null)
CFLAGS  := -std=c11 -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter -D_GNU_SOURCE \
           $(OPT) -Iinclude $(PKG_CFLAGS) $(EXTRA_CFLAGS)
LDLIBS  := $(PKG_LIBS) -lm

# Program entry points; every other file under src/ goes into the library.
MAINS   := src/service/mocod.c src/client/mococtl.c src/tools/mocopack.c
LIB_SRC := $(filter-out $(MAINS),$(wildcard src/*/*.c))
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/%.o)
LIB     := $(BUILD)/libmocod.a
PROGS   := $(foreach m,$(wildcard $(MAINS)),$(BIN)/$(basename $(notdir $(m))))

TEST_SRC := $(wildcard tests/test_*.c)
# The fuzz harnesses' bodies are linked into the tests too: test_fuzz_replay replays their corpora.
FUZZ_SRC := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_LIB_SRC := $(filter-out tests/fuzz/fuzz_util.c,$(FUZZ_SRC))
TEST_OBJ := $(TEST_SRC:%.c=$(BUILD)/%.o) $(BUILD)/tests/runner.o $(BUILD)/tests/testutil.o \
            $(BUILD)/tests/daemon_harness.o $(FUZZ_SRC:%.c=$(BUILD)/%.o)
SUITES   := $(patsubst tests/test_%.c,%,$(TEST_SRC))
BENCH_SRC := $(wildcard tests/bench/bench_*.c)
BENCHES  := $(patsubst tests/bench/%.c,$(BIN)/%,$(BENCH_SRC))
# Helper programs the test suites start (test_dist.c runs dist-check under mpirun).
TOOLS    := $(BIN)/dist-check
# Suites run in this many worker processes at once (tests/runner.c): they mostly wait on daemons and
# child programs, so 2 workers gain even on 2 cores (TEST_JOBS=1: one process, as before).
TEST_JOBS ?= 2

.PHONY: all deps test check asan bench run clean fuzz
all: $(PROGS)

deps:
	@scripts/install-deps.sh

# The test target installs what is missing first, so one command works on a fresh machine;
# the recursive make re-reads pkg-config once the packages are there.
test check: deps
	@$(MAKE) --no-print-directory test-run
asan:
	@$(MAKE) --no-print-directory test SANITIZE=1

.PHONY: test-run
test-run: $(BIN)/mocod-tests $(PROGS) $(TOOLS)
	@MOCOD_TEST_JOBS=$(TEST_JOBS) MOCOD_BIN=$(BIN) MOCOD_BUILD=$(BUILD) $(BIN)/mocod-tests

bench: deps
	@$(MAKE) --no-print-directory bench-run
.PHONY: bench-run
bench-run: $(BENCHES) $(PROGS)
	@. scripts/blas-env.sh; echo "OPENBLAS_CORETYPE=$${OPENBLAS_CORETYPE:-auto}"; \
	for b in $(BENCHES); do echo "== $$b"; MOCOD_BIN=$(BIN) $$b || exit 1; done

run: deps
	@$(MAKE) --no-print-directory all
	@scripts/run-default.sh $(BIN)

# The compiler and flags an object was built with: rewritten only when they change (a new MARCH, say),
# and every object depends on it, so objects of two flag sets are never linked together.
FLAGS_STAMP := $(BUILD)/flags.stamp
.PHONY: FORCE
$(FLAGS_STAMP): FORCE
	@mkdir -p $(dir $@)
	@echo '$(CC) $(CFLAGS)' | cmp -s - $@ || echo '$(CC) $(CFLAGS)' > $@

$(BUILD)/%.o: %.c $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(LIB): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	$(AR) rcs $@ $^

define PROGRAM_RULE
$(BIN)/$(basename $(notdir $(1))): $(BUILD)/$(1:.c=.o) $(LIB)
	@mkdir -p $$(dir $$@)
	$$(CC) $$(CFLAGS) $$< $(LIB) $$(LDLIBS) -o $$@
endef
$(foreach m,$(MAINS),$(eval $(call PROGRAM_RULE,$(m))))

$(BIN)/bench_%: $(BUILD)/tests/bench/bench_%.o $(BUILD)/tests/testutil.o $(BUILD)/tests/daemon_harness.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $^ $(LDLIBS) -o $@

$(BIN)/dist-check: $(BUILD)/tests/dist/dist_check.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $^ $(LDLIBS) -o $@

# The runner learns the suites from the file names: tests/test_foo.c provides foo_suite().
$(BUILD)/tests/suites.inc: $(TEST_SRC) Makefile
	@mkdir -p $(dir $@)
	@printf '%s\n' $(foreach s,$(SUITES),'SUITE($(s))') > $@
$(BUILD)/tests/runner.o: $(BUILD)/tests/suites.inc
$(BUILD)/tests/runner.o: CFLAGS += -I$(BUILD)/tests

$(BIN)/mocod-tests: $(TEST_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(TEST_OBJ) $(LIB) $(LDLIBS) -o $@

# libFuzzer (clang) under ASan + UBSan: every tests/fuzz/fuzz_<x>.c for FUZZ_SECONDS each, from its
# seed corpus tests/fuzz/corpus/<x>/ (new inputs go to build-fuzz/corpus/<x>/, crashes to build-fuzz/).
FUZZ_SECONDS ?= 10
FUZZ_CC      ?= clang
FUZZ_DIR     := build-fuzz
FUZZ_CFLAGS  := -std=c11 -Wall -Wextra -Werror -Wno-unused-parameter -D_GNU_SOURCE -O1 -g \
                -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
                -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION -Iinclude $(PKG_CFLAGS)
FUZZ_LIB_OBJ := $(LIB_SRC:%.c=$(FUZZ_DIR)/%.o)
FUZZERS      := $(patsubst tests/fuzz/%.c,$(FUZZ_DIR)/bin/%,$(FUZZ_LIB_SRC))

$(FUZZ_DIR)/src/%.o: src/%.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@
$(FUZZ_DIR)/tests/fuzz/%.o: tests/fuzz/%.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -DFUZZ_MAIN -fsanitize=fuzzer-no-link -Itests/fuzz -c $< -o $@
.PRECIOUS: $(FUZZ_DIR)/tests/fuzz/%.o
$(FUZZ_DIR)/libmocod.a: $(FUZZ_LIB_OBJ)
	$(AR) rcs $@ $^
$(FUZZ_DIR)/bin/fuzz_%: $(FUZZ_DIR)/tests/fuzz/fuzz_%.o $(FUZZ_DIR)/tests/fuzz/fuzz_util.o $(FUZZ_DIR)/libmocod.a
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $^ $(LDLIBS) -o $@

fuzz: $(FUZZERS)
	@for f in $(FUZZERS); do n=$$(basename $$f | sed 's/^fuzz_//'); echo "== fuzz $$n ($(FUZZ_SECONDS) s)"; \
	  mkdir -p $(FUZZ_DIR)/corpus/$$n; \
	  $$f -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	    -artifact_prefix=$(FUZZ_DIR)/crash-$$n- $(FUZZ_DIR)/corpus/$$n tests/fuzz/corpus/$$n \
	    > $(FUZZ_DIR)/$$n.log 2>&1 || { tail -60 $(FUZZ_DIR)/$$n.log; exit 1; }; \
	  grep -E '^Done [0-9]+ runs' $(FUZZ_DIR)/$$n.log; done

clean:
	rm -rf build build-asan build-fuzz

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
