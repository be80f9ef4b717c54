/* The engine's end of the step ring (otel_stepspan/exporter/ring.py), compiled.
 *
 * Why C: a paced step runs with cold caches (the GPU wait left the CPU idle for milliseconds),
 * and then every Python-level operation on the engine thread costs about a microsecond
 * (benchmarks/bench_paced.py). Packing a step and copying it into the ring from Python takes a
 * dozen of them; here it is one call. The layout, the counters and the record format are the
 * ones ring.py documents and reads; ring.py's own Ring.put is the same algorithm in Python, used
 * where this module could not be built.
 *
 * Thread safety: every call runs holding the GIL and never releases it, so puts from several
 * threads never interleave (all puts of a ring go through this type once it exists).
 * Ordering: the counter is stored with release semantics after the record's bytes, so a reader
 * on another CPU that sees the counter sees the bytes (x86 and ARM alike).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <marshal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_ringput.h"

#define HEADER 4096
#define WRITTEN 0 /* indexes of the header's 64-bit words, as in ring.py */
#define READ 8
#define DROPPED 16
#define PREFIX 8
#ifndef Py_MARSHAL_VERSION
#define Py_MARSHAL_VERSION 4
#endif

typedef struct {
    PyObject_HEAD
    Py_buffer view;        /* the whole mapping: header then data */
    int has_view;
    uint64_t capacity;     /* a power of two */
    uint64_t written;      /* bytes this end has written (mirrors the WRITTEN counter) */
    uint64_t room;         /* bytes free as of the last look at READ */
    unsigned long long put_total;
    PyObject *captured_tag; /* wire.CAPTURED */
} Producer;

static PyTypeObject SubmitterType; /* below */

static inline volatile uint64_t *counters(Producer *self) {
    return (volatile uint64_t *)self->view.buf;
}

/* One record, given in pieces that are copied one after the other: 1 put, 0 refused (full,
 * counted), -1 with an error when the ring is closed. */
static int copy_parts(Producer *self, const unsigned char *const *parts, const uint64_t *lens, int n) {
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "the ring is closed");
        return -1;
    }
    uint64_t size = 0;
    for (int p = 0; p < n; p++)
        size += lens[p];
    uint64_t need = size + PREFIX;
    volatile uint64_t *c = counters(self);
    if (size > 0xFFFFFFFFu)
        return 0;
    if (need > self->room) {
        uint64_t read = __atomic_load_n(&c[READ], __ATOMIC_ACQUIRE);
        self->room = self->capacity - (self->written - read);
        if (need > self->room) {
            c[DROPPED] += 1;
            return 0;
        }
    }
    unsigned char *data = (unsigned char *)self->view.buf + HEADER;
    uint64_t mask = self->capacity - 1;
    uint32_t words[2] = {(uint32_t)size, (uint32_t)size ^ 0xFFFFFFFFu};
    unsigned char prefix[PREFIX];
    /* little-endian length and its complement, as ring.py's struct "<II" */
    for (int i = 0; i < 4; i++) {
        prefix[i] = (unsigned char)(words[0] >> (8 * i));
        prefix[4 + i] = (unsigned char)(words[1] >> (8 * i));
    }
    uint64_t at = self->written & mask;
    /* the prefix, then the pieces, each split across the end of the circle when it must be */
    for (int p = -1; p < n; p++) {
        const unsigned char *part = p < 0 ? prefix : parts[p];
        uint64_t len = p < 0 ? PREFIX : lens[p];
        uint64_t first = self->capacity - at;
        if (len <= first) {
            memcpy(data + at, part, len);
        } else {
            memcpy(data + at, part, first);
            memcpy(data, part + first, len - first);
        }
        at = (at + len) & mask;
    }
    self->written += need;
    self->room -= need;
    self->put_total += 1;
    __atomic_store_n(&c[WRITTEN], self->written, __ATOMIC_RELEASE);
    return 1;
}

static int copy_record(Producer *self, const char *payload, uint64_t size) {
    const unsigned char *parts[1] = {(const unsigned char *)payload};
    return copy_parts(self, parts, &size, 1);
}

static PyObject *put_bytes(Producer *self, PyObject *marshalled) {
    char *bytes;
    Py_ssize_t size;
    if (PyBytes_AsStringAndSize(marshalled, &bytes, &size) < 0)
        return NULL;
    int put = copy_record(self, bytes, (uint64_t)size);
    return put < 0 ? NULL : PyBool_FromLong(put);
}

static PyObject *Producer_put(Producer *self, PyObject *payload) {
    if (!PyBytes_Check(payload)) {
        PyErr_Format(PyExc_TypeError, "a ring record is bytes, not %.100s", Py_TYPE(payload)->tp_name);
        return NULL;
    }
    return put_bytes(self, payload);
}

/* marshal's format (version 4) for the values a usual step holds, written by hand: None, bools,
 * ints up to 127 bits, floats, str, and tuples, lists and dicts of them. marshal.loads reads it as it
 * reads PyMarshal's own output. Why: PyMarshal_WriteObjectToString sets up a table of references
 * and a bytes object per call, and walks them with cold caches after the GPU wait; this writes
 * straight into a buffer on the stack. Anything else (or more than the buffer holds) returns -1,
 * with no error set, and the caller uses PyMarshal. */
typedef struct {
    unsigned char *at, *end;
} Out;

static int out_bytes(Out *out, const void *bytes, size_t n) {
    if ((size_t)(out->end - out->at) < n)
        return -1;
    memcpy(out->at, bytes, n);
    out->at += n;
    return 0;
}

static int out_byte(Out *out, unsigned char byte) {
    return out_bytes(out, &byte, 1);
}

static int out_u32(Out *out, uint32_t value) {
    unsigned char le[4] = {(unsigned char)value, (unsigned char)(value >> 8), (unsigned char)(value >> 16),
                           (unsigned char)(value >> 24)};
    return out_bytes(out, le, 4);
}

/* TYPE_LONG: the sign with the count of 15-bit digits, then the magnitude's digits, lowest first */
static int write_magnitude(Out *out, unsigned __int128 magnitude, int negative) {
    unsigned char digits[2 * 9];
    int n = 0;
    for (; magnitude != 0; magnitude >>= 15, n++) {
        digits[2 * n] = (unsigned char)(magnitude & 0xFF);
        digits[2 * n + 1] = (unsigned char)((magnitude >> 8) & 0x7F);
    }
    return out_byte(out, 'l') || out_u32(out, (uint32_t)(int32_t)(negative ? -n : n)) ||
           out_bytes(out, digits, (size_t)(2 * n));
}

static int write_long_long(Out *out, long long value) {
    if (value >= INT32_MIN && value <= INT32_MAX) /* TYPE_INT */
        return out_byte(out, 'i') || out_u32(out, (uint32_t)(int32_t)value);
    int negative = value < 0;
    return write_magnitude(out, negative ? (unsigned __int128)(-(value + 1)) + 1 : (unsigned __int128)value, negative);
}

static int write_int(Out *out, PyObject *value) {
    int overflow;
    long long small = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (small == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (!overflow)
        return write_long_long(out, small);
    if (_PyLong_NumBits(value) > 127)
        return -1;
    PyObject *absolute = PyNumber_Absolute(value);
    unsigned char le[16];
    int failed = absolute == NULL || _PyLong_AsByteArray((PyLongObject *)absolute, le, 16, 1, 0) < 0;
    Py_XDECREF(absolute);
    if (failed) {
        PyErr_Clear();
        return -1;
    }
    unsigned __int128 magnitude = 0;
    for (int i = 15; i >= 0; i--)
        magnitude = (magnitude << 8) | le[i];
    return write_magnitude(out, magnitude, overflow < 0);
}

static int write_value(Out *out, PyObject *value, int depth) {
    if (value == Py_None)
        return out_byte(out, 'N');
    if (value == Py_True || value == Py_False)
        return out_byte(out, value == Py_True ? 'T' : 'F');
    if (PyLong_CheckExact(value))
        return write_int(out, value);
    if (PyUnicode_CheckExact(value)) {
        Py_ssize_t size;
        if (PyUnicode_IS_ASCII(value)) {
            size = PyUnicode_GET_LENGTH(value);
            const void *text = PyUnicode_1BYTE_DATA(value);
            if (size < 256) /* TYPE_SHORT_ASCII */
                return out_byte(out, 'z') || out_byte(out, (unsigned char)size) || out_bytes(out, text, (size_t)size);
            return size > INT32_MAX || out_byte(out, 'a') || out_u32(out, (uint32_t)size) ||
                   out_bytes(out, text, (size_t)size) ? -1 : 0;
        }
        const char *utf8 = PyUnicode_AsUTF8AndSize(value, &size);
        if (utf8 == NULL) {
            PyErr_Clear();
            return -1;
        }
        return size > INT32_MAX || out_byte(out, 'u') || out_u32(out, (uint32_t)size) ||
               out_bytes(out, utf8, (size_t)size) ? -1 : 0;
    }
    if (PyFloat_CheckExact(value)) {
        unsigned char le[8];
        if (PyFloat_Pack8(PyFloat_AS_DOUBLE(value), (char *)le, 1) < 0) {
            PyErr_Clear();
            return -1;
        }
        return out_byte(out, 'g') || out_bytes(out, le, 8);
    }
    if (depth > 8)
        return -1;
    if (PyDict_CheckExact(value)) { /* TYPE_DICT: key, value, ..., then TYPE_NULL */
        Py_ssize_t pos = 0;
        PyObject *key, *item;
        if (out_byte(out, '{'))
            return -1;
        /* nothing here runs Python code that could change the dict while it is walked */
        while (PyDict_Next(value, &pos, &key, &item)) {
            if (write_value(out, key, depth + 1) < 0 || write_value(out, item, depth + 1) < 0)
                return -1;
        }
        return out_byte(out, '0');
    }
    int tuple = PyTuple_CheckExact(value);
    if (!tuple && !PyList_CheckExact(value))
        return -1;
    Py_ssize_t n = Py_SIZE(value);
    if (tuple && n < 256) { /* TYPE_SMALL_TUPLE */
        if (out_byte(out, ')') || out_byte(out, (unsigned char)n))
            return -1;
    } else if (n > INT32_MAX || out_byte(out, tuple ? '(' : '[') || out_u32(out, (uint32_t)n)) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        /* a list's items are read one at a time: nothing here runs Python code that could change it */
        PyObject *item = tuple ? PyTuple_GET_ITEM(value, i) : PyList_GET_ITEM(value, i);
        if (write_value(out, item, depth + 1) < 0)
            return -1;
    }
    return 0;
}

/* The head of wire.py's CAPTURED message, (CAPTURED, start, end, finisher, static, parent None,
 * exception None, extra None, and the fields' tuple, which the caller writes next. */
static int write_head(Out *out, PyObject *tag, long long start_ns, long long end_ns, long finisher_id,
                      long static_id) {
    return out_byte(out, ')') || out_byte(out, 9) || write_value(out, tag, 1) || write_long_long(out, start_ns) ||
           write_long_long(out, end_ns) || write_long_long(out, finisher_id) || write_long_long(out, static_id) ||
           out_bytes(out, "NNN", 3);
}

/* The CAPTURED message made as Python objects and marshalled by PyMarshal: for what the hand
 * writer does not carry, and for an erring step (its `exception` event). 1 put, 0 refused (full,
 * counted), -1 with an error. */
static int put_marshalled(Producer *self, long long start_ns, long long end_ns, long finisher_id, long static_id,
                          PyObject *exception, PyObject *fields) {
    PyObject *message = Py_BuildValue("(OLLllOOOO)", self->captured_tag, start_ns, end_ns, finisher_id, static_id,
                                      Py_None, exception, Py_None, fields);
    PyObject *marshalled = message != NULL ? PyMarshal_WriteObjectToString(message, Py_MARSHAL_VERSION) : NULL;
    int put = marshalled != NULL ? copy_record(self, PyBytes_AS_STRING(marshalled),
                                               (uint64_t)PyBytes_GET_SIZE(marshalled))
                                 : -1;
    Py_XDECREF(marshalled);
    Py_XDECREF(message);
    return put;
}

/* The CAPTURED message of a usual step, (CAPTURED, start, end, finisher, static, None, None,
 * None, tuple(fields)), marshalled and put: 1 put, 0 refused (full, counted), -1 with ValueError
 * when marshal cannot carry a field (the submitter then hands the step to the Python path). */
static int put_captured(Producer *self, long long start_ns, long long end_ns, long finisher_id, long static_id,
                        PyObject *captured) {
    unsigned char buffer[4096];
    Out out = {buffer, buffer + sizeof(buffer)};
    int written = write_head(&out, self->captured_tag, start_ns, end_ns, finisher_id, static_id);
    if (written == 0 && PyTuple_Check(captured)) { /* a NamedTuple goes as the plain tuple it is */
        Py_ssize_t n = PyTuple_GET_SIZE(captured);
        written = n < 256 ? out_byte(&out, ')') || out_byte(&out, (unsigned char)n) : -1;
        for (Py_ssize_t i = 0; written == 0 && i < n; i++)
            written = write_value(&out, PyTuple_GET_ITEM(captured, i), 2);
    } else {
        written = -1;
    }
    if (written == 0)
        return copy_record(self, (const char *)buffer, (uint64_t)(out.at - buffer));
    PyObject *fields = PySequence_Tuple(captured);
    if (fields == NULL)
        return -1;
    int put = put_marshalled(self, start_ns, end_ns, finisher_id, static_id, Py_None, fields);
    Py_DECREF(fields);
    return put;
}

/* Submitter: ExporterProcessSink.submit for the usual step, as one call with no Python frame.
 *
 * submitter(finishers, static_ids, slow, not_put, step_info_type, exception_event) is installed
 * as the sink's own `submit`. Called as submit(finish, captured, static_attributes, parent,
 * start_ns, end_ns, error) it puts the step's CAPTURED message when the step is the usual one: no
 * error, no extra, no current span in `parent`, `captured` not already a StepInfo, its finisher
 * known by a number >= 0 in `finishers` and its static attributes known by id() in `static_ids`.
 * Anything else, and anything that fails on the way, is handed to `slow` (the sink's Python
 * submit, which never raises) with the same arguments: the sink's behaviour is the Python one. A
 * full ring calls `not_put()`, which counts the step. Never raises. The compiled step call puts
 * its steps through the same submitter by the capsule's put_staged (_ringput.h), which makes an
 * error's event with `exception_event(error)`. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Producer *producer;
    PyObject *finishers;
    PyObject *static_ids;
    PyObject *slow;
    PyObject *not_put;
    PyObject *step_info_type;
    PyObject *exception_event;
    unsigned long long emitted;
} Submitter;

/* 1 with the numbers of `finish` and of `statics` set, or 0 with no error set when either is not
 * known yet (or `finish` runs on the engine thread). */
static int known_numbers(Submitter *self, PyObject *finish, PyObject *statics, long *finisher_id, long *static_id) {
    PyObject *finisher = PyDict_GetItemWithError(self->finishers, finish); /* borrowed */
    if (finisher == NULL || !PyLong_CheckExact(finisher) || (*finisher_id = PyLong_AsLong(finisher)) < 0)
        goto unknown;
    PyObject *key = PyLong_FromVoidPtr(statics);
    if (key == NULL)
        goto unknown;
    PyObject *known = PyDict_GetItemWithError(self->static_ids, key); /* borrowed */
    Py_DECREF(key);
    if (known == NULL || !PyTuple_Check(known) || PyTuple_GET_SIZE(known) < 1 ||
        !PyLong_CheckExact(PyTuple_GET_ITEM(known, 0)))
        goto unknown;
    *static_id = PyLong_AsLong(PyTuple_GET_ITEM(known, 0));
    if (*static_id == -1 && PyErr_Occurred())
        goto unknown;
    return 1;
unknown:
    PyErr_Clear();
    return 0;
}

/* A step the ring did not take: counted by the sink, as its Python path counts it. */
static void not_put(Submitter *self) {
    PyObject *counted = PyObject_CallNoArgs(self->not_put);
    if (counted == NULL)
        PyErr_Clear();
    Py_XDECREF(counted);
}

static PyObject *Submitter_vectorcall(Submitter *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL || nargs != 7 || !self->producer->has_view)
        goto slow;
    PyObject *finish = args[0], *captured = args[1], *statics = args[2], *parent = args[3], *error = args[6];
    if (error != Py_None || (PyObject *)Py_TYPE(captured) == self->step_info_type)
        goto slow;
    if (parent != Py_None) {
        int current = PyObject_IsTrue(parent); /* an empty context, the usual one, is false */
        if (current != 0)
            goto slow_clear;
    }
    long finisher_id, static_id;
    if (!known_numbers(self, finish, statics, &finisher_id, &static_id))
        goto slow;
    long long start_ns = PyLong_AsLongLong(args[4]), end_ns = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred())
        goto slow_clear;
    int put = put_captured(self->producer, start_ns, end_ns, finisher_id, static_id, captured);
    if (put < 0)
        goto slow_clear; /* e.g. a value marshal cannot carry: the sink describes the step itself */
    if (put)
        self->emitted += 1;
    else
        not_put(self);
    Py_RETURN_NONE;
slow_clear:
    PyErr_Clear();
slow:
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

/* -- the capsule's functions (_ringput.h) -- */

static int api_known_ids(PyObject *submitter, PyObject *finish, PyObject *statics, long *finisher_id,
                         long *static_id) {
    return Py_TYPE(submitter) == &SubmitterType &&
           known_numbers((Submitter *)submitter, finish, statics, finisher_id, static_id);
}

static int api_live(PyObject *submitter) {
    return Py_TYPE(submitter) == &SubmitterType && ((Submitter *)submitter)->producer->has_view;
}

static int api_write_value(unsigned char **at, unsigned char *end, PyObject *value, int depth) {
    Out out = {*at, end};
    if (write_value(&out, value, depth) < 0)
        return -1;
    *at = out.at;
    return 0;
}

/* An erring step: its fields read back from their bytes, and the message marshalled with the
 * exception's event. 1 put, 0 refused, -1 failed (errors cleared by the caller). */
static int put_erring(Submitter *self, long long start_ns, long long end_ns, long finisher_id, long static_id,
                      PyObject *error, const unsigned char *fields, size_t size) {
    PyObject *event = PyObject_CallOneArg(self->exception_event, error);
    PyObject *captured = event != NULL ? PyMarshal_ReadObjectFromString((const char *)fields, (Py_ssize_t)size) : NULL;
    int put = captured != NULL ? put_marshalled(self->producer, start_ns, end_ns, finisher_id, static_id, event, captured)
                               : -1;
    Py_XDECREF(captured);
    Py_XDECREF(event);
    return put;
}

static void api_put_staged(PyObject *submitter, long long start_ns, long long end_ns, long finisher_id,
                           long static_id, PyObject *error, const unsigned char *fields, size_t size) {
    Submitter *self = (Submitter *)submitter;
    int put = -1;
    if (error != NULL) {
        put = put_erring(self, start_ns, end_ns, finisher_id, static_id, error, fields, size);
    } else if (self->producer->has_view) {
        unsigned char head[128];
        Out out = {head, head + sizeof(head)};
        if (write_head(&out, self->producer->captured_tag, start_ns, end_ns, finisher_id, static_id) == 0) {
            const unsigned char *parts[2] = {head, fields};
            uint64_t lens[2] = {(uint64_t)(out.at - head), (uint64_t)size};
            put = copy_parts(self->producer, parts, lens, 2);
        }
    }
    if (put > 0) {
        self->emitted += 1;
        return;
    }
    PyErr_Clear();
    not_put(self); /* full, closed, or the erring step could not be made: counted as the sink counts it */
}

static RingputAPI ringput_api = {
    RINGPUT_API_VERSION, &SubmitterType, api_live, api_known_ids, api_write_value, api_put_staged,
};

static PyObject *Producer_submitter(Producer *self, PyObject *args) {
    PyObject *finishers, *static_ids, *slow, *not_put, *step_info_type, *exception_event;
    if (!PyArg_ParseTuple(args, "O!O!OOO!O", &PyDict_Type, &finishers, &PyDict_Type, &static_ids, &slow, &not_put,
                          &PyType_Type, &step_info_type, &exception_event))
        return NULL;
    if (!PyCallable_Check(slow) || !PyCallable_Check(not_put) || !PyCallable_Check(exception_event)) {
        PyErr_SetString(PyExc_TypeError, "submitter: slow, not_put and exception_event must be callable");
        return NULL;
    }
    Submitter *submitter = PyObject_New(Submitter, &SubmitterType);
    if (submitter == NULL)
        return NULL;
    submitter->vectorcall = (vectorcallfunc)Submitter_vectorcall;
    submitter->producer = (Producer *)Py_NewRef(self);
    submitter->finishers = Py_NewRef(finishers);
    submitter->static_ids = Py_NewRef(static_ids);
    submitter->slow = Py_NewRef(slow);
    submitter->not_put = Py_NewRef(not_put);
    submitter->step_info_type = Py_NewRef(step_info_type);
    submitter->exception_event = Py_NewRef(exception_event);
    submitter->emitted = 0;
    return (PyObject *)submitter;
}

static void Submitter_dealloc(Submitter *self) {
    Py_XDECREF(self->producer);
    Py_XDECREF(self->finishers);
    Py_XDECREF(self->static_ids);
    Py_XDECREF(self->slow);
    Py_XDECREF(self->not_put);
    Py_XDECREF(self->step_info_type);
    Py_XDECREF(self->exception_event);
    PyObject_Free(self);
}

static PyObject *Submitter_get_emitted(Submitter *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->emitted);
}

static PyGetSetDef Submitter_getset[] = {
    {"emitted", (getter)Submitter_get_emitted, NULL, "steps this submitter put in the ring", NULL},
    {NULL},
};

static PyTypeObject SubmitterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_stepspan.exporter._ringput.Submitter",
    .tp_doc = "ExporterProcessSink.submit for the usual step (see Producer.submitter)",
    .tp_basicsize = sizeof(Submitter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Submitter, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_dealloc = (destructor)Submitter_dealloc,
    .tp_getset = Submitter_getset,
};

static int Producer_init(Producer *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"mapping", "capacity", "captured_tag", NULL};
    PyObject *mapping, *tag;
    unsigned long long capacity;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OKO", names, &mapping, &capacity, &tag))
        return -1;
    if (capacity == 0 || (capacity & (capacity - 1))) {
        PyErr_Format(PyExc_ValueError, "the ring's capacity must be a power of two, not %llu", capacity);
        return -1;
    }
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "a Producer is initialised once");
        return -1;
    }
    if (PyObject_GetBuffer(mapping, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    self->has_view = 1;
    if ((uint64_t)self->view.len < HEADER + capacity) {
        PyErr_Format(PyExc_ValueError, "a mapping of %zd bytes cannot hold a ring of %llu", self->view.len, capacity);
        return -1;
    }
    volatile uint64_t *c = counters(self);
    self->capacity = capacity;
    self->written = c[WRITTEN];
    self->room = capacity - (self->written - c[READ]);
    Py_INCREF(tag);
    Py_XSETREF(self->captured_tag, tag);
    return 0;
}

static PyObject *Producer_release(Producer *self, PyObject *Py_UNUSED(ignored)) {
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    Py_RETURN_NONE;
}

static void Producer_dealloc(Producer *self) {
    if (self->has_view)
        PyBuffer_Release(&self->view);
    Py_XDECREF(self->captured_tag);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Producer_get_put_total(Producer *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->put_total);
}

static PyMethodDef Producer_methods[] = {
    {"put", (PyCFunction)Producer_put, METH_O, "put(payload: bytes) -> bool: copy one record in; False (counted as dropped) when full"},
    {"submitter", (PyCFunction)Producer_submitter, METH_VARARGS,
     "submitter(finishers, static_ids, slow, not_put, step_info_type, exception_event): the sink's submit for the usual step"},
    {"release", (PyCFunction)Producer_release, METH_NOARGS, "let go of the mapping (before it is closed)"},
    {NULL},
};

static PyGetSetDef Producer_getset[] = {
    {"put_total", (getter)Producer_get_put_total, NULL, "records this end has put", NULL},
    {NULL},
};

static PyTypeObject ProducerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_stepspan.exporter._ringput.Producer",
    .tp_doc = "The engine's end of a step ring: Producer(mapping, capacity, captured_tag)",
    .tp_basicsize = sizeof(Producer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Producer_init,
    .tp_dealloc = (destructor)Producer_dealloc,
    .tp_methods = Producer_methods,
    .tp_getset = Producer_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ringput", "The engine's end of the step ring, compiled (see ring.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__ringput(void) {
    if (PyType_Ready(&ProducerType) < 0 || PyType_Ready(&SubmitterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *api = PyCapsule_New(&ringput_api, RINGPUT_CAPSULE, NULL);
    if (api == NULL || PyModule_AddObjectRef(m, "_C_API", api) < 0 ||
        PyModule_AddObjectRef(m, "Producer", (PyObject *)&ProducerType) < 0) {
        Py_XDECREF(api);
        Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(api);
    return m;
}
