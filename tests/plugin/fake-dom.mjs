// A minimal DOM for the panel's tests: elements, text, attributes, click listeners (no layout, no HTML parsing).
class Node {
  constructor(doc) {
    this.ownerDocument = doc;
    this.childNodes = [];
    this.parentNode = null;
  }
  appendChild(child) {
    child.parentNode = this;
    this.childNodes.push(child);
    return child;
  }
  replaceChildren(...children) {
    this.childNodes = [];
    children.forEach(c => this.appendChild(c));
  }
  get textContent() {
    return this.childNodes.map(c => c.textContent).join('');
  }
}

class Text extends Node {
  constructor(doc, text) {
    super(doc);
    this.data = String(text);
  }
  get textContent() {
    return this.data;
  }
}

class Element extends Node {
  constructor(doc, tag) {
    super(doc);
    this.tagName = tag.toUpperCase();
    this.attributes = new Map();
    this.listeners = {};
  }
  setAttribute(name, value) {
    this.attributes.set(name, String(value));
  }
  getAttribute(name) {
    return this.attributes.has(name) ? this.attributes.get(name) : null;
  }
  set className(value) {
    this.setAttribute('class', value);
  }
  get className() {
    return this.getAttribute('class') || '';
  }
  set textContent(value) {
    this.childNodes = [new Text(this.ownerDocument, value)];
  }
  get textContent() {
    return super.textContent;
  }
  addEventListener(type, fn) {
    (this.listeners[type] ||= []).push(fn);
  }
  click() {
    (this.listeners.click || []).forEach(fn => fn({ type: 'click', target: this }));
  }
  *walk() {
    for (const child of this.childNodes) {
      if (child instanceof Element) {
        yield child;
        yield* child.walk();
      }
    }
  }
  /** Elements whose attribute `name` equals `value` (or exists, without value). */
  findAll(name, value) {
    return [...this.walk()].filter(e => (value === undefined ? e.attributes.has(name) : e.getAttribute(name) === value));
  }
  find(name, value) {
    return this.findAll(name, value)[0] || null;
  }
}

export class Document {
  createElement(tag) {
    return new Element(this, tag);
  }
  createTextNode(text) {
    return new Text(this, text);
  }
}

export function container() {
  return new Document().createElement('div');
}
