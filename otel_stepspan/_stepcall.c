/* A traced forward's usual step as one compiled call (otel_stepspan/runtime.py, wrap_method).
 *
 * Why C: a paced step runs with cold caches (the GPU wait left the CPU idle for milliseconds),
 * and then every Python-level operation on the engine thread costs about a microsecond
 * (benchmarks/bench_paced.py). The Python wrapper runs three frames and some sixty operations
 * per step around the engine's forward; this type does the same work as C calls.
 *
 * StepCall(method, slow, finish, captured_type, fields, guards, modes, pass_name, statics_of,
 *          runtime_globals, trace_api_globals, profiler_globals, get_current) behaves as `slow`,
 * the Python wrapper, and is installed in its place. It handles two cases itself and hands
 * every other call to `slow` unchanged:
 *
 * - nothing on (no profiler, no tracer provider, no OTEL_* variable asking for a sink: the test
 *   of runtime.sinks_off): the engine's forward, called at once;
 * - OpenTelemetry alone, the usual step: the runtime's state decided for the provider in place
 *   now, a sink that takes steps as they come (state.fast_sink: no GPU timer, no NVTX), an
 *   OpenTelemetry context that is empty or holds a current span without suppress_instrumentation()
 *   (runtime._suppressed's two keys), a runner whose static attributes `statics_of(runner)` gave, a batch
 *   whose `guards` attributes are all None and whose fields the plan below can read. Then: the
 *   capture by the plan, the clock, the forward, the clock, and sink.submit(finish, captured,
 *   static, context, start_ns, end_ns, error), as runtime.wrap_method's Python path calls it.
 *
 *   Staged, for a step with no current span (the ring's record carries no parent), where the
 *   sink is the exporter process's with the compiled ring producer and its
 *   submitter knows this finisher and runner already (every step after the first): the captured
 *   fields are written as the ring's marshal bytes before the forward, into a buffer on this
 *   call's stack, and after the forward the step is put with the clock and a copy alone
 *   (exporter/_ringput.h). Why: after the GPU wait each cache line touched is cold, and the
 *   submit's Python objects (the captured tuple, the times as ints, the sink's dicts) were most of
 *   what a paced step paid after its forward; the batch the plan reads is warm before it, the
 *   scheduler having just built it.
 *
 * The plan, `fields`, makes the captured tuple (of `captured_type`, tuple or a NamedTuple): each
 * item is a batch attribute name (a str; a missing attribute reads None), MODE (the batch's
 * forward_mode named through `modes`, a dict id(member) -> (member, name) that the Python capture
 * fills; an unknown member goes the slow way), PASS_ID (the runner's `pass_name` attribute plus
 * one where it is an int, else None), or any other object, taken as it is.
 *
 * Never raises into the engine: a failure before the forward hands the call to `slow`; one in
 * the submit is cleared. An exception from the forward is submitted with the step, then raised.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <string.h>
#include <time.h>

#include "exporter/_ringput.h"

#define RUNNERS 4
#define MODES 8
/* Bytes of marshalled fields a step may stage before its forward; a larger step is captured as
 * a tuple and submitted as before. */
#define STAGE 8192

static RingputAPI *ringput; /* the ring's compiled producer (exporter/_ringput.h), where it was built */

static PyObject *MODE, *PASS_ID; /* the plan's markers */
/* Bumped by runtime.otel_sink() whenever it decides (changed()): the state's fields a step call
 * keeps are read again. */
static unsigned long long decisions = 1;
static PyObject *ONE;
static PyObject *s_state, *s_provider, *s_wanted, *s_decided_for, *s_fast_sink, *s_profiler_enabled, *s_submit,
    *s_forward_mode, *s_torch_profiler_globals, *s_is_profiler_enabled, *s_suppress_key, *s_suppress_key_plain;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *dict; /* __dict__: functools.update_wrapper's __wrapped__, __name__, __doc__... */
    PyObject *method, *slow, *finish, *fields, *guards, *modes, *pass_name, *statics_of;
    PyTypeObject *captured_type; /* tuple, or a subclass such as a NamedTuple */
    PyObject *runtime, *trace_api, *profiler, *get_current;
    PyObject *runners[RUNNERS]; /* weak references to the runners seen last */
    PyObject *statics[RUNNERS]; /* their static attributes; NULL: that runner goes the slow way */
    PyObject *submitters[RUNNERS]; /* the submitter that knows them by the numbers beside it */
    long finisher_ids[RUNNERS], static_ids[RUNNERS];
    int next;
    /* What the runtime's state said as of `decisions` (see `seen`): why: every read of a Python
     * attribute after the GPU wait is a few cold cache lines, and these change only when the
     * runtime decides again, the state is replaced or the provider changes. */
    unsigned long long seen;
    PyObject *seen_state, *seen_provider; /* strong: compared by identity, never reused meanwhile */
    int wanted;                            /* state.wanted */
    PyObject *sink; /* state.fast_sink when state.decided_for is seen_provider, else NULL: the runtime decides */
    PyObject *submitter;                   /* sink.submit, while its ring is open (api->live) */
    PyObject *context_var;                 /* the ContextVar get_current reads, where it is one */
    PyObject *torch_flags;                 /* torch.autograd.profiler's globals, once found */
    PyObject *mode_members[MODES], *mode_names[MODES]; /* forward modes named already */
    unsigned long long fast_steps, staged_steps;
} StepCall;

/* time.time_ns(), as the Python wrapper reads it */
static long long now_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
}

/* 1 true, 0 false, -1 error */
static int call_truth(PyObject *callable) {
    PyObject *answer = PyObject_CallNoArgs(callable);
    if (answer == NULL)
        return -1;
    int truth = PyObject_IsTrue(answer);
    Py_DECREF(answer);
    return truth;
}

/* Whether a torch profiler records: torch's own flag where the profiler sink found it
 * (otel_stepspan/sinks/profiler.py, torch_profiler_globals), else its profiler_enabled().
 * 1 true, 0 false, -1 error. */
static int profiler_on(StepCall *self) {
    PyObject *flags = self->torch_flags;
    if (flags == NULL) {
        flags = PyDict_GetItemWithError(self->profiler, s_torch_profiler_globals);
        if (flags != NULL && PyDict_CheckExact(flags))
            self->torch_flags = Py_NewRef(flags); /* torch's module globals: found once, kept */
    }
    PyObject *flag = flags != NULL && PyDict_CheckExact(flags) ? PyDict_GetItemWithError(flags, s_is_profiler_enabled)
                                                                : NULL;
    if (flag == Py_True || flag == Py_False)
        return flag == Py_True;
    PyObject *enabled = PyErr_Occurred() ? NULL : PyDict_GetItemWithError(self->profiler, s_profiler_enabled);
    return enabled != NULL ? call_truth(enabled) : -1;
}

/* The runner's slot, whose statics are its static attributes, or -1: go the slow way (no error
 * set; so too when the slot's statics are NULL, a runner statics_of declined). */
static int slot_for(StepCall *self, PyObject *runner) {
    for (int i = 0; i < RUNNERS; i++) {
        if (self->runners[i] != NULL && PyWeakref_GET_OBJECT(self->runners[i]) == runner)
            return self->statics[i] != NULL ? i : -1;
    }
    PyObject *ref = PyWeakref_NewRef(runner, NULL);
    if (ref == NULL) {
        PyErr_Clear();
        return -1;
    }
    PyObject *statics = PyObject_CallOneArg(self->statics_of, runner);
    if (statics == NULL) {
        PyErr_Clear();
        Py_DECREF(ref);
        return -1;
    }
    if (statics == Py_None)
        Py_CLEAR(statics); /* declined: remembered, so that the runner is asked once */
    int slot = self->next;
    self->next = (slot + 1) % RUNNERS;
    Py_XSETREF(self->runners[slot], ref);
    Py_XSETREF(self->statics[slot], statics);
    Py_CLEAR(self->submitters[slot]);
    return statics != NULL ? slot : -1;
}

/* The numbers `submitter` knows this finisher and the slot's statics by: 1, or 0 (not known yet;
 * no error set). Kept in the slot: a submitter's numbers never change. */
static int ids_for(StepCall *self, int slot, PyObject *submitter, long *finisher_id, long *static_id) {
    if (self->submitters[slot] != submitter) {
        if (!ringput->known_ids(submitter, self->finish, self->statics[slot], &self->finisher_ids[slot],
                                &self->static_ids[slot]))
            return 0;
        Py_XSETREF(self->submitters[slot], Py_NewRef(submitter));
    }
    *finisher_id = self->finisher_ids[slot];
    *static_id = self->static_ids[slot];
    return 1;
}

/* The name of a forward mode member (borrowed), or NULL (no error set): the Python capture names
 * a member first, in `modes`; the names found there are kept here. */
static PyObject *mode_name(StepCall *self, PyObject *member) {
    int free = -1;
    for (int i = 0; i < MODES; i++) {
        if (self->mode_members[i] == member)
            return self->mode_names[i];
        if (self->mode_members[i] == NULL && free < 0)
            free = i;
    }
    PyObject *key = PyLong_FromVoidPtr(member);
    PyObject *hit = key != NULL ? PyDict_GetItemWithError(self->modes, key) : NULL; /* borrowed */
    Py_XDECREF(key);
    PyErr_Clear();
    if (hit == NULL || !PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) != 2 || PyTuple_GET_ITEM(hit, 0) != member)
        return NULL;
    PyObject *name = PyTuple_GET_ITEM(hit, 1);
    if (free >= 0) {
        self->mode_members[free] = Py_NewRef(member);
        self->mode_names[free] = Py_NewRef(name);
    }
    return name;
}

/* The sink's compiled submit (new reference), kept while its ring is open; or NULL, no error set:
 * the sink has no ring yet, or a Python one. */
static PyObject *sink_submitter(StepCall *self, PyObject *sink) {
    if (self->submitter == NULL || !ringput->live(self->submitter)) {
        PyObject *submit = PyObject_GetAttr(sink, s_submit);
        if (submit == NULL || Py_TYPE(submit) != ringput->submitter_type || !ringput->live(submit)) {
            Py_XDECREF(submit);
            PyErr_Clear();
            return NULL;
        }
        Py_XSETREF(self->submitter, submit);
    }
    return Py_NewRef(self->submitter);
}

/* The runtime's state as this call keeps it (see StepCall.seen): 0, or -1 with an error set. */
static int see_state(StepCall *self, PyObject *state, PyObject *provider) {
    PyObject *wanted = PyObject_GetAttr(state, s_wanted);
    int on = wanted != NULL ? PyObject_IsTrue(wanted) : -1;
    Py_XDECREF(wanted);
    PyObject *decided = on >= 0 ? PyObject_GetAttr(state, s_decided_for) : NULL;
    if (decided == NULL)
        return -1;
    Py_DECREF(decided); /* compared by identity only; the state holds it */
    PyObject *sink = NULL;
    if (decided == provider) {
        sink = PyObject_GetAttr(state, s_fast_sink);
        if (sink == NULL)
            return -1;
        if (sink == Py_None)
            Py_CLEAR(sink);
    }
    self->seen = decisions;
    Py_CLEAR(self->submitter);
    Py_XSETREF(self->seen_state, Py_NewRef(state));
    Py_XSETREF(self->seen_provider, Py_NewRef(provider));
    Py_XSETREF(self->sink, sink);
    self->wanted = on;
    return 0;
}

/* A batch attribute, new reference (None when missing), or NULL with an error. */
static PyObject *read_attribute(PyObject *obj, PyObject *name) {
    PyObject *value = NULL;
    if (_PyObject_LookupAttr(obj, name, &value) < 0)
        return NULL;
    return value != NULL ? value : Py_NewRef(Py_None);
}

/* 1 when the batch's `guards` attributes are all None; 0 when one is not (or on an error). */
static int guards_clear(StepCall *self, PyObject *batch) {
    Py_ssize_t n = PyTuple_GET_SIZE(self->guards);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = read_attribute(batch, PyTuple_GET_ITEM(self->guards, i));
        int none = value == Py_None;
        Py_XDECREF(value);
        if (!none)
            return 0;
    }
    return 1;
}

/* One item of the plan, read (new reference), or NULL (error set or not): the step goes another
 * way. MODE of a member not named yet is NULL: the Python capture names it and remembers it. */
static PyObject *plan_value(StepCall *self, PyObject *runner, PyObject *batch, PyObject *item) {
    if (item == MODE) {
        PyObject *member = read_attribute(batch, s_forward_mode);
        if (member == NULL)
            return NULL;
        PyObject *name = mode_name(self, member);
        Py_DECREF(member);
        return Py_XNewRef(name);
    }
    if (item == PASS_ID) {
        PyObject *counter = read_attribute(runner, self->pass_name);
        if (counter == NULL)
            return NULL;
        PyObject *value = PyLong_CheckExact(counter) ? PyNumber_Add(counter, ONE) : Py_NewRef(Py_None);
        Py_DECREF(counter);
        return value;
    }
    if (PyUnicode_CheckExact(item))
        return read_attribute(batch, item);
    return Py_NewRef(item);
}

/* The captured tuple by the plan, or NULL: go the slow way (error set or not). */
static PyObject *capture(StepCall *self, PyObject *runner, PyObject *batch) {
    if (!guards_clear(self, batch))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(self->fields);
    PyObject *captured = self->captured_type == &PyTuple_Type ? PyTuple_New(n)
                                                              : self->captured_type->tp_alloc(self->captured_type, n);
    if (captured == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = plan_value(self, runner, batch, PyTuple_GET_ITEM(self->fields, i));
        if (value == NULL) {
            Py_DECREF(captured);
            return NULL;
        }
        PyTuple_SET_ITEM(captured, i, value);
    }
    return captured;
}

/* The captured fields by the plan, written as the ring's marshal bytes into `buffer` (STAGE bytes)
 * rather than made into a tuple: what capture() would make, item by item. The size written, or 0
 * (no error set): a guard is not None, a mode is not known yet, a value the writer cannot carry;
 * capture() then decides for that step. */
static size_t stage(StepCall *self, PyObject *runner, PyObject *batch, unsigned char *buffer) {
    Py_ssize_t n = PyTuple_GET_SIZE(self->fields);
    if (n > 255 || !guards_clear(self, batch))
        goto declined;
    unsigned char *at = buffer, *end = buffer + STAGE;
    *at++ = ')'; /* TYPE_SMALL_TUPLE: a NamedTuple goes as the plain tuple it is */
    *at++ = (unsigned char)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = plan_value(self, runner, batch, PyTuple_GET_ITEM(self->fields, i));
        int written = value != NULL ? ringput->write_value(&at, end, value, 2) : -1;
        Py_XDECREF(value);
        if (written < 0)
            goto declined;
    }
    return (size_t)(at - buffer);
declined:
    PyErr_Clear();
    return 0;
}

/* The engine's forward as it went: its times, and the exception it raised (else all NULL),
 * fetched, normalized and given its traceback, for the step; the caller restores it after. */
typedef struct {
    long long start_ns, end_ns;
    PyObject *type, *value, *traceback;
} Forward;

static PyObject *timed_forward(StepCall *self, PyObject *const *args, size_t nargsf, PyObject *kwnames,
                               Forward *forward) {
    forward->type = forward->value = forward->traceback = NULL;
    forward->start_ns = now_ns();
    PyObject *result = PyObject_Vectorcall(self->method, args, nargsf, kwnames);
    forward->end_ns = now_ns();
    if (result == NULL) {
        PyErr_Fetch(&forward->type, &forward->value, &forward->traceback);
        PyErr_NormalizeException(&forward->type, &forward->value, &forward->traceback);
        if (forward->value != NULL && forward->traceback != NULL)
            PyException_SetTraceback(forward->value, forward->traceback);
    }
    return result;
}

/* The usual step, staged: the fields written before the forward, the step put in the ring after
 * it with nothing but the clock and a copy (see exporter/_ringput.h). The sink, the context and
 * the runner's statics are let go before the forward: after it, only the submitter is touched. */
static PyObject *staged_call(StepCall *self, PyObject *submitter, long finisher_id, long static_id,
                             const unsigned char *fields, size_t size, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    self->fast_steps += 1;
    self->staged_steps += 1;
    Forward forward;
    PyObject *result = timed_forward(self, args, nargsf, kwnames, &forward);
    ringput->put_staged(submitter, forward.start_ns, forward.end_ns, finisher_id, static_id, forward.value, fields,
                        size);
    Py_DECREF(submitter);
    if (result == NULL)
        PyErr_Restore(forward.type, forward.value, forward.traceback);
    return result;
}

static PyObject *slow(StepCall *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PyErr_Clear();
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

static void submit(PyObject *sink, PyObject *const *args) {
    PyObject *submitter = PyObject_GetAttr(sink, s_submit);
    PyObject *done = submitter != NULL ? PyObject_Vectorcall(submitter, args, 7, NULL) : NULL;
    Py_XDECREF(submitter);
    if (done == NULL)
        PyErr_Clear(); /* sink.submit never raises; should one, the engine goes on */
    Py_XDECREF(done);
}

/* 1 when a current context (a dict, as OpenTelemetry's Context is) carries neither of the keys
 * of OpenTelemetry's suppress_instrumentation(), as runtime._suppressed reads them; 0 when one is
 * set; -1 when that cannot be told here (no error is left set). */
static int unsuppressed(StepCall *self, PyObject *context) {
    if (!PyDict_Check(context))
        return -1;
    PyObject *names[2] = {s_suppress_key, s_suppress_key_plain};
    for (int i = 0; i < 2; i++) {
        PyObject *key = PyDict_GetItemWithError(self->runtime, names[i]);
        PyObject *value = key != NULL ? PyDict_GetItemWithError(context, key) : NULL;
        int set = value != NULL ? PyObject_IsTrue(value) : (PyErr_Occurred() || key == NULL ? -1 : 0);
        if (set != 0) {
            PyErr_Clear();
            return set > 0 ? 0 : -1;
        }
    }
    return 1;
}

static PyObject *StepCall_vectorcall(StepCall *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 2)
        return slow(self, args, nargsf, kwnames); /* the batch passed by keyword, or no batch */
    PyObject *runner = args[0], *batch = args[1];
    /* Borrowed module globals: each read every call, as the Python wrapper reads them. */
    PyObject *state = PyDict_GetItemWithError(self->runtime, s_state);
    PyObject *provider = PyDict_GetItemWithError(self->trace_api, s_provider);
    if (state == NULL || provider == NULL)
        return slow(self, args, nargsf, kwnames);
    if ((self->seen != decisions || self->seen_state != state || self->seen_provider != provider) &&
        see_state(self, state, provider) < 0)
        return slow(self, args, nargsf, kwnames);
    int profiling = profiler_on(self);
    if (profiling < 0)
        return slow(self, args, nargsf, kwnames);
    if (!profiling && provider == Py_None && !self->wanted) /* runtime.sinks_off() */
        return PyObject_Vectorcall(self->method, args, nargsf, kwnames);
    if (profiling || self->sink == NULL)
        return slow(self, args, nargsf, kwnames); /* the runtime decides, or the step needs more */
    PyObject *sink = Py_NewRef(self->sink); /* held: another thread may see the state change */
    PyObject *context = NULL;
    if (self->context_var != NULL) {
        if (PyContextVar_Get(self->context_var, NULL, &context) == 0 && context == NULL)
            context = Py_NewRef(Py_None); /* no value and no default: no current span */
    } else {
        context = PyObject_CallNoArgs(self->get_current);
    }
    int current = context != NULL ? PyObject_IsTrue(context) : -1;
    if (current > 0 && unsuppressed(self, context) <= 0)
        current = -1; /* suppressed, or a context of an odd kind: the Python wrapper decides */
    int slot = current >= 0 ? slot_for(self, runner) : -1;
    PyObject *statics = slot >= 0 ? self->statics[slot] : NULL;
    /* The ring's record carries no parent: a step under a current span is submitted with it. */
    PyObject *submitter = current == 0 && statics != NULL && ringput != NULL ? sink_submitter(self, sink) : NULL;
    if (submitter != NULL) {
        long finisher_id, static_id;
        unsigned char fields[STAGE];
        size_t size = ids_for(self, slot, submitter, &finisher_id, &static_id) ? stage(self, runner, batch, fields) : 0;
        if (size > 0) {
            Py_DECREF(context);
            Py_DECREF(sink);
            return staged_call(self, submitter, finisher_id, static_id, fields, size, args, nargsf, kwnames);
        }
    }
    Py_XDECREF(submitter);
    PyErr_Clear();
    PyObject *captured = statics != NULL ? capture(self, runner, batch) : NULL;
    if (captured == NULL) {
        Py_DECREF(sink);
        Py_XDECREF(context);
        return slow(self, args, nargsf, kwnames); /* suppression, an odd batch or context */
    }
    Py_INCREF(statics); /* the slot may change hands while the forward runs */
    Forward forward;
    PyObject *result = timed_forward(self, args, nargsf, kwnames, &forward);
    PyObject *start = PyLong_FromLongLong(forward.start_ns), *end = PyLong_FromLongLong(forward.end_ns);
    if (start != NULL && end != NULL) {
        PyObject *call[7] = {self->finish, captured, statics, context, start, end,
                             forward.value != NULL ? forward.value : Py_None};
        submit(sink, call);
        self->fast_steps += 1;
    } else {
        PyErr_Clear();
    }
    if (result == NULL)
        PyErr_Restore(forward.type, forward.value, forward.traceback);
    Py_XDECREF(start);
    Py_XDECREF(end);
    Py_DECREF(statics);
    Py_DECREF(captured);
    Py_DECREF(context);
    Py_DECREF(sink);
    return result;
}

/* The ring's compiled producer, once: PyCapsule_Import imports only the capsule's top package. */
static void load_ringput(void) {
    static int tried;
    if (tried)
        return;
    tried = 1;
    PyObject *module = PyImport_ImportModule("otel_stepspan.exporter._ringput");
    RingputAPI *api = module != NULL ? (RingputAPI *)PyCapsule_Import(RINGPUT_CAPSULE, 0) : NULL;
    Py_XDECREF(module);
    if (api != NULL && api->version == RINGPUT_API_VERSION)
        ringput = api;
    PyErr_Clear(); /* not built: every step is captured as a tuple and submitted */
}

static PyObject *StepCall_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    load_ringput();
    StepCall *self = (StepCall *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = (vectorcallfunc)StepCall_vectorcall;
    if (!PyArg_ParseTuple(args, "OOOO!O!O!O!UOO!O!O!O:StepCall", &self->method, &self->slow, &self->finish,
                          &PyType_Type, &self->captured_type, &PyTuple_Type, &self->fields, &PyTuple_Type,
                          &self->guards, &PyDict_Type, &self->modes, &self->pass_name, &self->statics_of,
                          &PyDict_Type, &self->runtime, &PyDict_Type, &self->trace_api, &PyDict_Type,
                          &self->profiler, &self->get_current))
        goto fail;
    if (!PyType_IsSubtype(self->captured_type, &PyTuple_Type) ||
        self->captured_type->tp_itemsize != sizeof(PyObject *)) {
        PyErr_SetString(PyExc_TypeError, "StepCall: the captured type must be tuple or a subclass of it");
        goto fail;
    }
    PyObject **owned[] = {&self->method, (PyObject **)&self->captured_type, &self->slow, &self->finish,
                          &self->fields, &self->guards, &self->modes, &self->pass_name, &self->statics_of, &self->runtime, &self->trace_api, &self->profiler,
                          &self->get_current};
    for (size_t i = 0; i < sizeof(owned) / sizeof(owned[0]); i++)
        Py_INCREF(*owned[i]);
    /* get_current as ContextVar.get, bound: read the variable without the call */
    PyObject *bound = PyCFunction_Check(self->get_current) ? PyCFunction_GET_SELF(self->get_current) : NULL;
    if (bound != NULL && PyContextVar_CheckExact(bound) &&
        strcmp(((PyCFunctionObject *)self->get_current)->m_ml->ml_name, "get") == 0)
        self->context_var = Py_NewRef(bound);
    return (PyObject *)self;
fail: /* nothing was taken yet: StepCall_clear must not release what the parse only borrowed */
    self->method = self->slow = self->finish = self->fields = self->guards = self->modes = NULL;
    self->captured_type = NULL;
    self->pass_name = self->statics_of = self->runtime = self->trace_api = self->profiler = NULL;
    self->get_current = NULL;
    Py_DECREF(self);
    return NULL;
}

/* Every place where a StepCall holds a reference, for the GC's traverse and clear. */
#define HELD_MAX (20 + 3 * RUNNERS + 2 * MODES)
static int held(StepCall *self, PyObject **places[HELD_MAX]) {
    PyObject **fixed[] = {
        &self->dict, &self->method, &self->slow, &self->finish, (PyObject **)&self->captured_type, &self->fields,
        &self->guards, &self->modes, &self->pass_name, &self->statics_of, &self->runtime, &self->trace_api,
        &self->profiler, &self->get_current, &self->seen_state, &self->seen_provider, &self->sink,
        &self->submitter, &self->context_var, &self->torch_flags,
    };
    int n = 0;
    for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++)
        places[n++] = fixed[i];
    for (int i = 0; i < RUNNERS; i++) {
        places[n++] = &self->runners[i];
        places[n++] = &self->statics[i];
        places[n++] = &self->submitters[i];
    }
    for (int i = 0; i < MODES; i++) {
        places[n++] = &self->mode_members[i];
        places[n++] = &self->mode_names[i];
    }
    return n;
}

static int StepCall_traverse(StepCall *self, visitproc visit, void *arg) {
    PyObject **places[HELD_MAX];
    int n = held(self, places);
    for (int i = 0; i < n; i++)
        Py_VISIT(*places[i]);
    return 0;
}

static int StepCall_clear(StepCall *self) {
    PyObject **places[HELD_MAX];
    int n = held(self, places);
    for (int i = 0; i < n; i++)
        Py_CLEAR(*places[i]);
    self->seen = 0;
    return 0;
}

static void StepCall_dealloc(StepCall *self) {
    PyObject_GC_UnTrack(self);
    StepCall_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* As a plain function: bound to the runner when read from it. */
static PyObject *StepCall_get(PyObject *self, PyObject *obj, PyObject *type) {
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static PyGetSetDef StepCall_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

static PyMemberDef StepCall_members[] = {
    {"fast_steps", T_ULONGLONG, offsetof(StepCall, fast_steps), READONLY,
     "steps this call traced without the Python wrapper"},
    {"staged_steps", T_ULONGLONG, offsetof(StepCall, staged_steps), READONLY,
     "of those, steps whose fields were written for the ring before the forward (exporter/_ringput.h)"},
    {NULL},
};

static PyTypeObject StepCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_stepspan._stepcall.StepCall",
    .tp_doc = "A traced forward's usual step as one compiled call (see otel_stepspan/_stepcall.c)",
    .tp_basicsize = sizeof(StepCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_vectorcall_offset = offsetof(StepCall, vectorcall),
    .tp_dictoffset = offsetof(StepCall, dict),
    .tp_call = PyVectorcall_Call,
    .tp_new = StepCall_new,
    .tp_traverse = (traverseproc)StepCall_traverse,
    .tp_clear = (inquiry)StepCall_clear,
    .tp_dealloc = (destructor)StepCall_dealloc,
    .tp_descr_get = StepCall_get,
    .tp_getset = StepCall_getset,
    .tp_members = StepCall_members,
};

static PyObject *changed(PyObject *module, PyObject *Py_UNUSED(ignored)) {
    decisions += 1;
    Py_RETURN_NONE;
}

static PyMethodDef module_functions[] = {
    {"changed", changed, METH_NOARGS,
     "changed(): the runtime's state decided again; every step call reads it anew (runtime.otel_sink)"},
    {NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "otel_stepspan._stepcall",
                                    "A traced forward's usual step as one compiled call.", -1, module_functions};

PyMODINIT_FUNC PyInit__stepcall(void) {
    if (PyType_Ready(&StepCallType) < 0)
        return NULL;

    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    MODE = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    PASS_ID = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    ONE = PyLong_FromLong(1);
    s_state = PyUnicode_InternFromString("_state");
    s_provider = PyUnicode_InternFromString("_TRACER_PROVIDER");
    s_wanted = PyUnicode_InternFromString("wanted");
    s_decided_for = PyUnicode_InternFromString("decided_for");
    s_fast_sink = PyUnicode_InternFromString("fast_sink");
    s_profiler_enabled = PyUnicode_InternFromString("profiler_enabled");
    s_submit = PyUnicode_InternFromString("submit");
    s_forward_mode = PyUnicode_InternFromString("forward_mode");
    s_torch_profiler_globals = PyUnicode_InternFromString("torch_profiler_globals");
    s_is_profiler_enabled = PyUnicode_InternFromString("_is_profiler_enabled");
    s_suppress_key = PyUnicode_InternFromString("_SUPPRESS_KEY");
    s_suppress_key_plain = PyUnicode_InternFromString("_SUPPRESS_KEY_PLAIN");
    if (MODE == NULL || s_suppress_key == NULL || s_suppress_key_plain == NULL || PASS_ID == NULL || ONE == NULL || s_is_profiler_enabled == NULL || s_forward_mode == NULL || PyModule_AddObjectRef(m, "MODE", MODE) < 0 ||
        PyModule_AddObjectRef(m, "PASS_ID", PASS_ID) < 0 ||
        PyModule_AddObjectRef(m, "StepCall", (PyObject *)&StepCallType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
