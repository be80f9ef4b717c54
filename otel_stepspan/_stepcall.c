/* A traced forward's usual step as one compiled call (otel_stepspan/runtime.py, wrap_method).
 *
 * Why C: a paced step runs with cold caches (the GPU wait left the CPU idle for milliseconds),
 * and then every Python-level operation on the engine thread costs about a microsecond
 * (benchmarks/bench_paced.py). The Python wrapper runs three frames and some sixty operations
 * per step around the engine's forward; this type does the same work as C calls.
 *
 * StepCall(method, slow, finish, captured_type, fields, guards, modes, pass_name, statics_of,
 *          runtime_globals, trace_api_globals, profiler_globals, get_current) behaves as `slow`, the Python
 * wrapper, and is installed in its place. It handles two cases itself and hands every other
 * call to `slow` unchanged:
 *
 * - nothing on (no profiler, no tracer provider, no OTEL_* variable asking for a sink: the test
 *   of runtime.sinks_off): the engine's forward, called at once;
 * - OpenTelemetry alone, the usual step: the runtime's state decided for the provider in place
 *   now, a sink that takes steps as they come (state.fast_sink: no GPU timer, no NVTX), an empty
 *   OpenTelemetry context, a runner whose static attributes `statics_of(runner)` gave, a batch
 *   whose `guards` attributes are all None and whose fields the plan below can read. Then: the
 *   capture by the plan, the clock, the forward, the clock, and sink.submit(finish, captured,
 *   static, context, start_ns, end_ns, error), as runtime.wrap_method's Python path calls it.
 *
 * The plan, `fields`, makes the captured tuple (of `captured_type`, tuple or a NamedTuple): each item is a batch attribute name (a str; a
 * missing attribute reads None), MODE (the batch's forward_mode named through `modes`, a dict
 * id(member) -> (member, name) that the Python capture fills; an unknown member goes the slow
 * way), PASS_ID (the runner's `pass_name` attribute plus one where it is an int, else None), or
 * any other object, taken as it is.
 *
 * Never raises into the engine: a failure before the forward hands the call to `slow`; one in
 * the submit is cleared. An exception from the forward is submitted with the step, then raised.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <time.h>

#define RUNNERS 4

static PyObject *MODE, *PASS_ID; /* the plan's markers */
static PyObject *ONE;
static PyObject *s_state, *s_provider, *s_wanted, *s_decided_for, *s_fast_sink, *s_profiler_enabled, *s_submit,
    *s_forward_mode, *s_torch_profiler_globals, *s_is_profiler_enabled;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *dict; /* __dict__: functools.update_wrapper's __wrapped__, __name__, __doc__... */
    PyObject *method, *slow, *finish, *fields, *guards, *modes, *pass_name, *statics_of;
    PyTypeObject *captured_type; /* tuple, or a subclass such as a NamedTuple */
    PyObject *runtime, *trace_api, *profiler, *get_current;
    PyObject *runners[RUNNERS]; /* weak references to the runners seen last */
    PyObject *statics[RUNNERS]; /* their static attributes; NULL: that runner goes the slow way */
    int next;
    unsigned long long fast_steps;
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
    PyObject *flags = PyDict_GetItemWithError(self->profiler, s_torch_profiler_globals);
    PyObject *flag = flags != NULL && PyDict_CheckExact(flags) ? PyDict_GetItemWithError(flags, s_is_profiler_enabled)
                                                                : NULL;
    if (flag == Py_True || flag == Py_False)
        return flag == Py_True;
    PyObject *enabled = PyErr_Occurred() ? NULL : PyDict_GetItemWithError(self->profiler, s_profiler_enabled);
    return enabled != NULL ? call_truth(enabled) : -1;
}

/* The runner's static attributes (borrowed), or NULL: go the slow way (no error set). */
static PyObject *statics_for(StepCall *self, PyObject *runner) {
    for (int i = 0; i < RUNNERS; i++) {
        if (self->runners[i] != NULL && PyWeakref_GET_OBJECT(self->runners[i]) == runner)
            return self->statics[i];
    }
    PyObject *ref = PyWeakref_NewRef(runner, NULL);
    if (ref == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *statics = PyObject_CallOneArg(self->statics_of, runner);
    if (statics == NULL) {
        PyErr_Clear();
        Py_DECREF(ref);
        return NULL;
    }
    if (statics == Py_None)
        Py_CLEAR(statics); /* declined: remembered, so that the runner is asked once */
    int slot = self->next;
    self->next = (slot + 1) % RUNNERS;
    Py_XSETREF(self->runners[slot], ref);
    Py_XSETREF(self->statics[slot], statics);
    return statics;
}

/* A batch attribute, new reference (None when missing), or NULL with an error. */
static PyObject *read_attribute(PyObject *obj, PyObject *name) {
    PyObject *value = NULL;
    if (_PyObject_LookupAttr(obj, name, &value) < 0)
        return NULL;
    return value != NULL ? value : Py_NewRef(Py_None);
}

/* The captured tuple by the plan, or NULL: go the slow way (error set or not). */
static PyObject *capture(StepCall *self, PyObject *runner, PyObject *batch) {
    Py_ssize_t n = PyTuple_GET_SIZE(self->guards);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = read_attribute(batch, PyTuple_GET_ITEM(self->guards, i));
        if (value == NULL)
            return NULL;
        int none = value == Py_None;
        Py_DECREF(value);
        if (!none)
            return NULL;
    }
    n = PyTuple_GET_SIZE(self->fields);
    PyObject *captured = self->captured_type == &PyTuple_Type ? PyTuple_New(n)
                                                              : self->captured_type->tp_alloc(self->captured_type, n);
    if (captured == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(self->fields, i), *value;
        if (item == MODE) {
            PyObject *member = read_attribute(batch, s_forward_mode);
            if (member == NULL)
                goto fail;
            PyObject *key = PyLong_FromVoidPtr(member);
            PyObject *hit = key != NULL ? PyDict_GetItemWithError(self->modes, key) : NULL; /* borrowed */
            Py_XDECREF(key);
            int known = hit != NULL && PyTuple_CheckExact(hit) && PyTuple_GET_SIZE(hit) == 2 &&
                        PyTuple_GET_ITEM(hit, 0) == member;
            Py_DECREF(member);
            if (!known)
                goto fail; /* the Python capture names it and remembers it */
            value = Py_NewRef(PyTuple_GET_ITEM(hit, 1));
        } else if (item == PASS_ID) {
            PyObject *counter = read_attribute(runner, self->pass_name);
            if (counter == NULL)
                goto fail;
            if (PyLong_CheckExact(counter)) {
                value = PyNumber_Add(counter, ONE);
                Py_DECREF(counter);
                if (value == NULL)
                    goto fail;
            } else {
                Py_DECREF(counter);
                value = Py_NewRef(Py_None);
            }
        } else if (PyUnicode_CheckExact(item)) {
            value = read_attribute(batch, item);
            if (value == NULL)
                goto fail;
        } else {
            value = Py_NewRef(item);
        }
        PyTuple_SET_ITEM(captured, i, value);
    }
    return captured;
fail:
    Py_DECREF(captured);
    return NULL;
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
    int profiling = profiler_on(self);
    if (profiling < 0)
        return slow(self, args, nargsf, kwnames);
    if (!profiling && provider == Py_None) { /* runtime.sinks_off() */
        PyObject *wanted = PyObject_GetAttr(state, s_wanted);
        int on = wanted != NULL ? PyObject_IsTrue(wanted) : -1;
        Py_XDECREF(wanted);
        if (on == 0)
            return PyObject_Vectorcall(self->method, args, nargsf, kwnames);
    }
    if (profiling)
        return slow(self, args, nargsf, kwnames);
    PyObject *decided = PyObject_GetAttr(state, s_decided_for);
    if (decided == NULL)
        return slow(self, args, nargsf, kwnames);
    Py_DECREF(decided); /* compared by identity only; the state holds it */
    if (decided != provider)
        return slow(self, args, nargsf, kwnames); /* the runtime decides for the provider in place */
    PyObject *sink = PyObject_GetAttr(state, s_fast_sink);
    if (sink == NULL || sink == Py_None) {
        Py_XDECREF(sink);
        return slow(self, args, nargsf, kwnames); /* no sink, or one that is not for this path */
    }
    PyObject *context = PyObject_CallNoArgs(self->get_current);
    int current = context != NULL ? PyObject_IsTrue(context) : -1;
    PyObject *statics = current == 0 ? statics_for(self, runner) : NULL;
    PyObject *captured = statics != NULL ? capture(self, runner, batch) : NULL;
    if (captured == NULL) {
        Py_DECREF(sink);
        Py_XDECREF(context);
        return slow(self, args, nargsf, kwnames); /* a current span, suppression, an odd batch */
    }
    Py_INCREF(statics); /* the slot may change hands while the forward runs */
    long long start_ns = now_ns();
    PyObject *result = PyObject_Vectorcall(self->method, args, nargsf, kwnames);
    long long end_ns = now_ns();
    PyObject *type = NULL, *value = NULL, *traceback = NULL;
    if (result == NULL) {
        PyErr_Fetch(&type, &value, &traceback);
        PyErr_NormalizeException(&type, &value, &traceback);
        if (value != NULL && traceback != NULL)
            PyException_SetTraceback(value, traceback);
    }
    PyObject *start = PyLong_FromLongLong(start_ns), *end = PyLong_FromLongLong(end_ns);
    if (start != NULL && end != NULL) {
        PyObject *call[7] = {self->finish, captured, statics, context, start, end, value != NULL ? value : Py_None};
        submit(sink, call);
        self->fast_steps += 1;
    } else {
        PyErr_Clear();
    }
    if (result == NULL)
        PyErr_Restore(type, value, traceback);
    Py_XDECREF(start);
    Py_XDECREF(end);
    Py_DECREF(statics);
    Py_DECREF(captured);
    Py_DECREF(context);
    Py_DECREF(sink);
    return result;
}

static PyObject *StepCall_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
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
    return (PyObject *)self;
fail: /* nothing was taken yet: StepCall_clear must not release what the parse only borrowed */
    self->method = self->slow = self->finish = self->fields = self->guards = self->modes = NULL;
    self->captured_type = NULL;
    self->pass_name = self->statics_of = self->runtime = self->trace_api = self->profiler = NULL;
    self->get_current = NULL;
    Py_DECREF(self);
    return NULL;
}

static int StepCall_traverse(StepCall *self, visitproc visit, void *arg) {
    Py_VISIT(self->dict);
    Py_VISIT(self->method);
    Py_VISIT(self->slow);
    Py_VISIT(self->finish);
    Py_VISIT(self->captured_type);
    Py_VISIT(self->fields);
    Py_VISIT(self->guards);
    Py_VISIT(self->modes);
    Py_VISIT(self->pass_name);
    Py_VISIT(self->statics_of);
    Py_VISIT(self->runtime);
    Py_VISIT(self->trace_api);
    Py_VISIT(self->profiler);
    Py_VISIT(self->get_current);
    for (int i = 0; i < RUNNERS; i++)
        Py_VISIT(self->statics[i]);
    return 0;
}

static int StepCall_clear(StepCall *self) {
    Py_CLEAR(self->dict);
    Py_CLEAR(self->method);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->finish);
    Py_CLEAR(self->captured_type);
    Py_CLEAR(self->fields);
    Py_CLEAR(self->guards);
    Py_CLEAR(self->modes);
    Py_CLEAR(self->pass_name);
    Py_CLEAR(self->statics_of);
    Py_CLEAR(self->runtime);
    Py_CLEAR(self->trace_api);
    Py_CLEAR(self->profiler);
    Py_CLEAR(self->get_current);
    for (int i = 0; i < RUNNERS; i++) {
        Py_CLEAR(self->runners[i]);
        Py_CLEAR(self->statics[i]);
    }
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

static PyObject *StepCall_get_fast_steps(StepCall *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->fast_steps);
}

static PyGetSetDef StepCall_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {"fast_steps", (getter)StepCall_get_fast_steps, NULL, "steps this call traced without the Python wrapper", NULL},
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
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "otel_stepspan._stepcall",
                                    "A traced forward's usual step as one compiled call.", -1, NULL};

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
    if (MODE == NULL || PASS_ID == NULL || ONE == NULL || s_is_profiler_enabled == NULL || s_forward_mode == NULL || PyModule_AddObjectRef(m, "MODE", MODE) < 0 ||
        PyModule_AddObjectRef(m, "PASS_ID", PASS_ID) < 0 ||
        PyModule_AddObjectRef(m, "StepCall", (PyObject *)&StepCallType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
