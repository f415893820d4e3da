// A small msgpack codec for the node runner: the subset msgspec produces and step values need
// (nil, bool, int, float64, str, bin, array, map). Kept here rather than installed from npm so
// a JavaScript step needs nothing but `node` on the host.

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder("utf-8", { fatal: false });

class Raw {
  // Bytes that are already msgpack: written as they are (the step's encoded output).
  constructor(bytes) {
    this.bytes = bytes;
  }
}

class Writer {
  constructor() {
    this.buffer = new Uint8Array(1024);
    this.view = new DataView(this.buffer.buffer);
    this.length = 0;
  }

  reserve(n) {
    if (this.length + n <= this.buffer.length) return;
    let size = this.buffer.length * 2;
    while (size < this.length + n) size *= 2;
    const grown = new Uint8Array(size);
    grown.set(this.buffer.subarray(0, this.length));
    this.buffer = grown;
    this.view = new DataView(grown.buffer);
  }

  byte(b) {
    this.reserve(1);
    this.buffer[this.length++] = b;
  }

  bytes(data) {
    this.reserve(data.length);
    this.buffer.set(data, this.length);
    this.length += data.length;
  }

  uint(kind, n, value) {
    // kind: the type byte; n: 1, 2, 4 or 8 bytes of big-endian value
    this.reserve(1 + n);
    this.buffer[this.length++] = kind;
    if (n === 1) this.view.setUint8(this.length, value);
    else if (n === 2) this.view.setUint16(this.length, value);
    else if (n === 4) this.view.setUint32(this.length, value);
    else this.view.setBigUint64(this.length, BigInt(value));
    this.length += n;
  }

  result() {
    return this.buffer.subarray(0, this.length);
  }
}

function writeLength(w, length, fix, fixMax, k8, k16, k32) {
  if (length <= fixMax && fix !== null) w.byte(fix | length);
  else if (length < 0x100 && k8 !== null) w.uint(k8, 1, length);
  else if (length < 0x10000) w.uint(k16, 2, length);
  else w.uint(k32, 4, length);
}

function writeInteger(w, value) {
  if (value >= 0) {
    if (value < 0x80) w.byte(value);
    else if (value < 0x100) w.uint(0xcc, 1, value);
    else if (value < 0x10000) w.uint(0xcd, 2, value);
    else if (value < 0x100000000) w.uint(0xce, 4, value);
    else w.uint(0xcf, 8, value);
    return;
  }
  if (value >= -32) {
    w.byte(value & 0xff);
    return;
  }
  w.reserve(9);
  if (value >= -0x80) {
    w.buffer[w.length++] = 0xd0;
    w.view.setInt8(w.length, value);
    w.length += 1;
  } else if (value >= -0x8000) {
    w.buffer[w.length++] = 0xd1;
    w.view.setInt16(w.length, value);
    w.length += 2;
  } else if (value >= -0x80000000) {
    w.buffer[w.length++] = 0xd2;
    w.view.setInt32(w.length, value);
    w.length += 4;
  } else {
    w.buffer[w.length++] = 0xd3;
    w.view.setBigInt64(w.length, BigInt(value));
    w.length += 8;
  }
}

function writeValue(w, value, depth) {
  if (depth > 512) throw new TypeError("value nested too deeply to encode");
  if (value === null || value === undefined) return w.byte(0xc0);
  if (value === true) return w.byte(0xc3);
  if (value === false) return w.byte(0xc2);
  if (value instanceof Raw) return w.bytes(value.bytes);
  switch (typeof value) {
    case "number":
      if (Number.isSafeInteger(value)) return writeInteger(w, value);
      w.reserve(9);
      w.buffer[w.length++] = 0xcb;
      w.view.setFloat64(w.length, value);
      w.length += 8;
      return;
    case "bigint":
      if (value >= -(2n ** 63n) && value < 2n ** 64n) {
        if (value >= 0n) return w.uint(0xcf, 8, value);
        w.reserve(9);
        w.buffer[w.length++] = 0xd3;
        w.view.setBigInt64(w.length, value);
        w.length += 8;
        return;
      }
      throw new TypeError("bigint out of the 64-bit range");
    case "string": {
      const data = textEncoder.encode(value);
      writeLength(w, data.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
      return w.bytes(data);
    }
    case "object":
      break;
    default:
      throw new TypeError(`cannot encode a value of type ${typeof value}`);
  }
  if (value instanceof Uint8Array || value instanceof ArrayBuffer) {
    const data = value instanceof ArrayBuffer ? new Uint8Array(value) : value;
    writeLength(w, data.length, null, -1, 0xc4, 0xc5, 0xc6);
    return w.bytes(data);
  }
  if (value instanceof Date) return writeValue(w, value.toISOString(), depth + 1);
  if (Array.isArray(value)) {
    writeLength(w, value.length, 0x90, 15, null, 0xdc, 0xdd);
    for (const item of value) writeValue(w, item, depth + 1);
    return;
  }
  const entries = value instanceof Map ? [...value.entries()] : Object.entries(value);
  const kept = entries.filter(([, v]) => v !== undefined && typeof v !== "function");
  writeLength(w, kept.length, 0x80, 15, null, 0xde, 0xdf);
  for (const [key, item] of kept) {
    writeValue(w, key, depth + 1);
    writeValue(w, item, depth + 1);
  }
}

function encode(value) {
  const w = new Writer();
  writeValue(w, value, 0);
  return w.result();
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.offset = 0;
  }

  need(n) {
    if (this.offset + n > this.bytes.length) throw new RangeError("truncated msgpack data");
  }

  take(n) {
    this.need(n);
    const start = this.offset;
    this.offset += n;
    return start;
  }

  u8() { return this.view.getUint8(this.take(1)); }
  u16() { return this.view.getUint16(this.take(2)); }
  u32() { return this.view.getUint32(this.take(4)); }

  slice(n) {
    const start = this.take(n);
    return this.bytes.subarray(start, start + n);
  }
}

function readString(r, n) {
  return textDecoder.decode(r.slice(n));
}

function readArray(r, n, depth) {
  const out = new Array(n);
  for (let i = 0; i < n; i++) out[i] = readValue(r, depth + 1);
  return out;
}

function readMap(r, n, depth) {
  const out = {};
  for (let i = 0; i < n; i++) {
    const key = readValue(r, depth + 1);
    const value = readValue(r, depth + 1);
    // defineProperty so a key named __proto__ stays data, never a prototype change.
    Object.defineProperty(out, String(key), { value, enumerable: true, writable: true, configurable: true });
  }
  return out;
}

function bigOrNumber(big) {
  return big >= BigInt(Number.MIN_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
}

function readValue(r, depth) {
  if (depth > 512) throw new RangeError("msgpack data nested too deeply");
  const b = r.u8();
  if (b <= 0x7f) return b;
  if (b >= 0xe0) return b - 0x100;
  if ((b & 0xe0) === 0xa0) return readString(r, b & 0x1f);
  if ((b & 0xf0) === 0x90) return readArray(r, b & 0x0f, depth);
  if ((b & 0xf0) === 0x80) return readMap(r, b & 0x0f, depth);
  switch (b) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: return r.slice(r.u8());
    case 0xc5: return r.slice(r.u16());
    case 0xc6: return r.slice(r.u32());
    case 0xca: return r.view.getFloat32(r.take(4));
    case 0xcb: return r.view.getFloat64(r.take(8));
    case 0xcc: return r.u8();
    case 0xcd: return r.u16();
    case 0xce: return r.u32();
    case 0xcf: return bigOrNumber(r.view.getBigUint64(r.take(8)));
    case 0xd0: return r.view.getInt8(r.take(1));
    case 0xd1: return r.view.getInt16(r.take(2));
    case 0xd2: return r.view.getInt32(r.take(4));
    case 0xd3: return bigOrNumber(r.view.getBigInt64(r.take(8)));
    case 0xd9: return readString(r, r.u8());
    case 0xda: return readString(r, r.u16());
    case 0xdb: return readString(r, r.u32());
    case 0xdc: return readArray(r, r.u16(), depth);
    case 0xdd: return readArray(r, r.u32(), depth);
    case 0xde: return readMap(r, r.u16(), depth);
    case 0xdf: return readMap(r, r.u32(), depth);
    default: throw new RangeError(`unsupported msgpack type byte 0x${b.toString(16)}`);
  }
}

function decode(bytes) {
  const r = new Reader(bytes);
  const value = readValue(r, 0);
  if (r.offset !== bytes.length) throw new RangeError("trailing bytes after msgpack value");
  return value;
}

module.exports = { Raw, encode, decode };
